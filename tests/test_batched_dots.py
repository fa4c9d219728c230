"""Attention einsums lowered as one canonical dot_general (runtime/batched_dots.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from runtime.batched_dots import batched_einsum, plan

CASES = [
    ("BLKGD,BTKD->BKGLT", (2, 5, 3, 2, 4), (2, 7, 3, 4)),  # grouped-query scores
    ("BKGLT,BTKD->BLKGD", (2, 3, 2, 5, 7), (2, 7, 3, 4)),  # grouped-query probs x values
    ("BLHD,BTD->BHLT", (2, 5, 3, 4), (2, 7, 4)),  # multiquery
    ("BHLT,BTD->BLHD", (2, 3, 5, 7), (2, 7, 4)),
    ("BLHD,BTHD->BHLT", (3, 1, 4, 8), (3, 16, 4, 8)),  # a decode step, multihead
    ("BHLT,BTHD->BLHD", (3, 4, 1, 16), (3, 16, 4, 8)),
]


@pytest.mark.parametrize("spec,sa,sb", CASES)
def test_equals_einsum(spec, sa, sb):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    got = batched_einsum(spec, jnp.asarray(a), jnp.asarray(b), lax.Precision.HIGHEST)
    want = np.einsum(spec, a.astype(np.float64), b.astype(np.float64))
    assert got is not None and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["BLE,EF->BLF", "ij,jk->ik", "BLE,VE->BLV", "ii,ij->j", "BLE,E->BL"])
def test_no_batch_dim_is_left_to_einsum(spec):
    """Projections (no batch dim) and einsums that sum a letter within one operand are not
    taken (the caller keeps jnp.einsum / its matmul path)."""
    p = plan(spec)
    assert p is None or not p[0] or not p[3]


def test_prefill_scores_are_not_transposed():
    """The [K, G, L, T] score tensor of a grouped-query prefill is produced, masked and
    normalised in its own layout: no copy/transpose fusion in the optimized HLO writes a tensor
    of its size (jnp.einsum's lowering made XLA CPU write two such copies)."""
    B, L, K, G, D = 1, 256, 3, 3, 64

    def attn(q, k, v):
        s = batched_einsum("BLKGD,BTKD->BKGLT", q, k, lax.Precision.HIGHEST) * 0.125
        s = jnp.where(jnp.arange(L)[None, :] > jnp.arange(L)[:, None], -jnp.inf, s)
        return batched_einsum("BKGLT,BTKD->BLKGD", jax.nn.softmax(s, axis=-1), v, lax.Precision.HIGHEST)

    q = jnp.ones((B, L, K, G, D))
    kv = jnp.ones((B, L, K, D))
    hlo = jax.jit(attn).lower(q, kv, kv).compile().as_text()
    big = f"[{K * G * L},{L}]", f"[{K},{G * L},{L}]", f"[{K},{L},{G * L}]", f"[1,{K},{G},{L},{L}]", f"[{K},{G},{L},{L}]"
    copies = [ln for ln in hlo.splitlines()
              if ("copy" in ln.split("=")[0] or "transpose" in ln.split("=")[0]) and any(s in ln.split("(")[0] for s in big)]
    assert not copies, copies
