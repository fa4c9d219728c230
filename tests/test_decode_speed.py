"""The decode-speed lowering choices: projections as 2-D matmuls, KV-cache context buckets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from runtime.lower_jax import JaxBackend
from runtime.model_runner import ModelRunner
from runtime.projections import projection


@pytest.mark.parametrize("spec,shapes,matmul", [
    ("BLKGD,KGDE->BLE", [(2, 1, 3, 2, 4), (3, 2, 4, 5)], True),  # attention output projection
    ("BLE,EKGD->BLKGD", [(2, 3, 5), (5, 3, 2, 4)], True),
    ("BLF,FE->BLE", [(1, 2, 6), (6, 5)], True),
    ("BLE,VE->BLV", [(1, 2, 5), (7, 5)], True),  # contracted letter trailing in both: [out, in]
    ("BKGLT,BTKD->BLKGD", [(1, 3, 2, 1, 4), (1, 4, 3, 5)], False),  # batch letters
    ("BLE,EF->BF", [(1, 2, 5), (5, 3)], False),  # L summed away
])
def test_projections_lower_to_a_matmul_with_einsum_values(spec, shapes, matmul) -> None:
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    assert (projection(spec, xs[0].shape, xs[1].shape) is not None) == matmul
    got = np.asarray(JaxBackend().einsum(spec, *xs))
    want = np.einsum(spec, *[np.asarray(x, np.float64) for x in xs])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_context_buckets_fit_the_request_and_the_runner() -> None:
    r = ModelRunner(build=lambda *a: None, weights={}, cache_len=512, vocab=8)  # type: ignore[arg-type]
    assert [r.context_for(n) for n in (1, 9, 33, 64, 65, 129, 500, 512)] == [8, 16, 64, 64, 128, 192, 512, 512]
    assert ModelRunner(build=lambda *a: None, weights={}, cache_len=96, vocab=8).context_for(65) == 96  # type: ignore[arg-type]
