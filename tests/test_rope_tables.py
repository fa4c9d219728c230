"""Rotary cos/sin computed once per traced program (runtime/lower_jax.py JaxBackend.rope_tables)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from runtime.kernels import RULES
from runtime.lower_jax import JaxBackend

OP = SimpleNamespace(rotary_dim=16, theta=10000.0, style="half")
TS = (SimpleNamespace(names="BLKD"), SimpleNamespace(names="BL"))


def _layers(be, x, pos, n):
    """n 'layers' each applying the rope rule to the running value."""
    for _ in range(n):
        x = RULES["rope"](OP, (x, pos), TS, be, None)[0] * 1.5
    return x


def test_one_sine_and_cosine_for_every_layer():
    """Four layers' ropes over the same positions: one sin and one cos in the optimized HLO (XLA
    fused the tables into each consumer, recomputing them per layer and per element), and the
    same values as the per-layer form."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 3, 16)).astype(np.float32))
    pos = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    once = jax.jit(lambda x, p: _layers(JaxBackend(), x, p, 4))
    txt = once.lower(x, pos).compile().as_text()
    assert sum(ln.count(" sine(") for ln in txt.splitlines()) == 1
    assert sum(ln.count(" cosine(") for ln in txt.splitlines()) == 1
    per_layer = JaxBackend()
    per_layer.rope_tables = None  # the shared rule's own cos/sin
    want = jax.jit(lambda x, p: _layers(per_layer, x, p, 4))(x, pos)
    np.testing.assert_array_equal(np.asarray(once(x, pos)), np.asarray(want))


def test_tables_of_a_scan_body_are_not_reused_outside_it():
    """Tables made while tracing a loop body belong to that trace: a later use of the same
    positions outside it computes its own (no escaped tracer)."""
    be = JaxBackend()
    x = jnp.ones((1, 4, 2, 16), jnp.float32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]

    def f(x, pos):
        y, _ = lax.scan(lambda c, _: (_layers(be, c, pos, 1), None), x, None, length=2)
        return _layers(be, y, pos, 1)

    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, pos)), np.asarray(_layers(be, _layers(be, _layers(be, x, pos, 1), pos, 1), pos, 1)), rtol=1e-6)
