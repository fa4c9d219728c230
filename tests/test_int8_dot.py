"""runtime.lower_jax.int8_dot: int8 projections with per-row int8 activations (the CPU default).

* It computes exactly the stated integer arithmetic: each row quantized to round(x / s) with
  s = max|x_row| / 127, an exact int32 product, times s (checked against numpy's int64 matmul).
* A row's result does not depend on the batch it runs in (1 row, padded to 2 internally, and 5
  rows give bitwise the same values).
* Sharded over the contracted dim inside shard_map, the rows share their scale (pmax) and the
  summed partial products equal one device's.
* The JAX backend uses it for int8 projections by default on CPU, and not when told not to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from runtime.lower_jax import JaxBackend, int8_dot


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 96)) * rng.uniform(0.1, 3, (rows, 1))).astype(np.float32)
    x[0, 7] = 40.0  # an outlier sets row 0's scale
    return x, rng.integers(-127, 128, (48, 96)).astype(np.int8)


def _numpy_int8_dot(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    s = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.round(x / s).astype(np.int64)
    assert np.abs(q).max() <= 127
    return (q @ m.astype(np.int64).T).astype(np.float32) * s


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_dot_is_the_integer_product(rows) -> None:
    x, m = _data(rows)
    got = np.asarray(jax.jit(int8_dot)(x, m))
    np.testing.assert_array_equal(got, _numpy_int8_dot(x, m))
    ref = x @ m.astype(np.float32).T  # and it approximates the f32 product: 1/254 of max|x| per term
    assert np.abs(got - ref).max() <= np.abs(x).max() / 254 * np.abs(m.astype(np.float32)).sum(1).max()


def test_a_row_does_not_depend_on_its_batch() -> None:
    x, m = _data(5, seed=1)
    whole = np.asarray(jax.jit(int8_dot)(x, m))
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(jax.jit(int8_dot)(x[i:i + 1], m)), whole[i:i + 1])


def test_sharded_over_the_contracted_dim_equals_one_device() -> None:
    x, m = _data(3, seed=2)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    f = jax.shard_map(lambda a, b: jax.lax.psum(int8_dot(a, b, ("x",)), "x"), mesh=mesh,
                      in_specs=(P(None, "x"), P(None, "x")), out_specs=P())
    got = np.asarray(jax.jit(f)(x, m))
    np.testing.assert_allclose(got, _numpy_int8_dot(x, m), rtol=1e-6, atol=1e-6 * np.abs(got).max())
    # without the shared scale each half would round on its own scale: visibly different
    g = jax.shard_map(lambda a, b: jax.lax.psum(int8_dot(a, b), "x"), mesh=mesh,
                      in_specs=(P(None, "x"), P(None, "x")), out_specs=P(), check_vma=False)
    assert not np.allclose(np.asarray(jax.jit(g)(x, m)), got, rtol=1e-6, atol=0)


def test_backend_uses_it_for_int8_projections() -> None:
    x, m = _data(2, seed=3)
    x = x.astype(jnp.bfloat16).astype(np.float32)  # the program's bf16 activations
    scale = np.full((48,), 0.5, np.float32)
    outs = []
    for on in (True, False):
        be = JaxBackend(int8_activations=on)

        def f(a, q):
            w = q.T.astype(jnp.bfloat16)  # logical [C, Q], remembered as stored [Q, C]
            be.sources._stored[id(w)] = (w, q, 1, 1)
            wd = w * jnp.asarray(scale, jnp.bfloat16)
            be.sources.dequantized(wd, w, jnp.asarray(scale), "C", "CQ")
            return be.einsum("PC,CQ->PQ", a.astype(jnp.bfloat16), wd)

        got = np.asarray(jax.jit(f)(x, m), np.float32)
        want = _numpy_int8_dot(x, m) * scale if on else (x @ m.astype(np.float32).T) * scale
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())  # bf16 output
        outs.append(got)
    assert not np.array_equal(*outs)
