"""runtime/small_rows.py: a few-row f32 projection runs weight first, with the plain dot's values."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from runtime import small_rows
from runtime.lower_jax import materialized


def _dots(P: int) -> list[str]:
    """The output shapes of the dots in the optimized HLO of a P-row projection."""
    x = jnp.zeros((P, 96), jnp.float32)
    w = jnp.zeros((160, 96), jnp.float32)
    f = jax.jit(lambda x, w: small_rows.rows_dot(x, w, lax.Precision.HIGHEST, materialized) * 2.0)
    text = f.lower(x, w).compile().as_text()
    return re.findall(r"= f32\[(\d+,\d+)\]\S* dot\(", text)


@pytest.mark.parametrize("P", [2, 8, 16])
def test_few_rows_run_weight_first(P):
    # the [Q, P] product survives XLA's simplifier (not folded back into dot(x, w))
    assert _dots(P) == [f"160,{P}"]


@pytest.mark.parametrize("P", [1, 17, 64])
def test_other_row_counts_keep_the_plain_dot(P):
    assert _dots(P) == [f"{P},160"]


@pytest.mark.parametrize("P", [1, 3, 8, 40])
def test_values_equal_the_plain_dot(P):
    rng = np.random.default_rng(P)
    x = rng.standard_normal((P, 96)).astype(np.float32)
    w = rng.standard_normal((160, 96)).astype(np.float32)
    y = jax.jit(lambda x, w: small_rows.rows_dot(x, w, lax.Precision.HIGHEST, materialized))(x, w)
    assert y.shape == (P, 160)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
