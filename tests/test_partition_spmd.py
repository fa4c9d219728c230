"""Every layout of the paper, on random small models and meshes, computes the reference's logits.

Random models (serial/parallel block, MHA/MQA/GQA, gelu/gelu-tanh/swiglu, layernorm/rmsnorm,
bias none/mlp/all, tied or separate embeddings) x meshes of up to 8 devices in 1-3 axes x every
FFN layout (1d-ws, 2d-ws, wg-x, wg-xy, wg-xyz) x attention (heads, batch) x prefill only or
prefill + decode steps. The partitioned module runs on the numpy SPMD simulator
(runtime/spmd.py: one thread per device, each holding only its local blocks, collectives at a
rendezvous) through runtime.generate.generate, and must equal the float64 reference interpreter
run on the *unpartitioned* module the builder emits.

Tolerance: 1e-9 normwise (max |spmd - ref| / max |ref|). Both sides compute in float64 with the
same kernels; the only legitimate difference is reassociation (a contraction split into
per-device partial sums and then psum'd, a norm's statistics summed per shard), i.e. a few ulps
(~1e-16) times the number of terms (<= a few hundred) per layer: ~1e-14 at most. Observed:
<= 1e-15. A missing, doubled or misplaced collective gives O(1) errors, so 1e-9 separates them by
many orders of magnitude; it is also the tolerance ``einshard run --check --spmd`` uses.

Layouts that cannot be split evenly must be refused with a LayoutError naming the dim, its size
and the mesh axes (tests/partition_helpers.py: ``expected_layout_problems`` predicts them from the
layout definitions, independently of the compiler); those examples are asserted, not filtered.
``hypothesis.assume`` is not used: no generated combination is out of scope.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from compiler.spec import ModelSpec
from partition_helpers import (ATTN_LAYOUTS, FFN_LAYOUTS, cases, check_partitioned, compile_layout,
                               expected_layout_problems)
from runtime.spmd import SpmdExecutor

TOL = 1e-9


def check_case(*case) -> None:
    check_partitioned(case, SpmdExecutor, TOL, "SPMD")


# Sizes that divide the mesh where the layouts need it (heads padded or multiples of the mesh).
# MHA and MQA: every FFN x attention layout must fit, so every example runs on the simulator.
@settings(max_examples=400)
@given(cases(divisible=True, attention=("mha", "mqa")))
def test_spmd_equals_reference_mha_mqa(case):
    check_case(*case)


# Grouped-query attention with divisible E, F and batch. The kv heads K (2 or 4) and the query
# groups G may not divide the wide axes; the oracle predicts the LayoutErrors (no padding for GQA).
@settings(max_examples=200)
@given(cases(divisible=True, attention=("gqa",)))
def test_spmd_equals_reference_gqa(case):
    check_case(*case)


# Arbitrary sizes (batch 1-9, E/F/heads not multiples of anything): each example either is
# refused with the LayoutError the oracle predicts, or runs and matches.
@settings(max_examples=400)
@given(cases(divisible=False, attention=("mha", "mqa", "gqa")))
def test_spmd_any_sizes_refuses_or_matches(case):
    check_case(*case)


# ---- explicit grid: every layout on the three attention kinds, 8 devices, both phases ----------

GRID_MODELS = {
    "mha-serial-gelu-bias": ModelSpec("g-mha", layers=2, d_model=32, heads=8, kv_heads=8, d_head=4, d_ff=64, vocab=40,
                                      block="serial", mlp="gelu", norm="layernorm", bias="all"),
    "mqa-parallel-swiglu": ModelSpec("g-mqa", layers=2, d_model=32, heads=8, kv_heads=1, d_head=8, d_ff=48, vocab=64,
                                     block="parallel", mlp="swiglu", norm="layernorm", tie_embeddings=True),
    "gqa-serial-rms": ModelSpec("g-gqa", layers=2, d_model=32, heads=16, kv_heads=8, d_head=4, d_ff=32, vocab=32,
                                block="serial", mlp="gelu-tanh", norm="rmsnorm", bias="mlp"),
}


@pytest.mark.parametrize("attn", ATTN_LAYOUTS)
@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
@pytest.mark.parametrize("name", sorted(GRID_MODELS))
def test_spmd_grid_8_devices(name, ffn, attn):
    """Every layout on 2x2x2 with sizes that divide everything: all must run (no LayoutError)."""
    model = GRID_MODELS[name]
    mesh = (("x", 2), ("y", 2), ("z", 2))
    assert not expected_layout_problems(model, 8, mesh, ffn, attn)
    check_case(model, mesh, ffn, attn, "decode", 8, 3, 2, False, "shard")


def test_spmd_batch_sharded_cache_is_one_eighth_per_device():
    """The simulator really is distributed: each device holds 1/8 of the batch-sharded KV cache."""
    model = GRID_MODELS["mqa-parallel-swiglu"]
    mesh = (("x", 2), ("y", 2), ("z", 2))
    m = compile_layout(model, 8, 2, 4, mesh, "2d-ws", "batch")
    kc = m.function("decode").param("k_cache").type
    assert kc.local_nbytes(m.mesh_sizes) * 8 == kc.nbytes()
    np.testing.assert_equal(kc.dim("B").axes, ("z", "y", "x"))


# ---- every head count on every mesh (issue 11 §1) -------------------------------------------------
# Heads 1-16 with any kv_heads dividing them, meshes of 1-3 axes of any sizes up to 8 devices,
# every FFN x attention layout, both phases, batch 1-16, kv = auto (cost model) or pad. Every
# configuration runs and equals the reference, except the rule table partition_helpers.refusals
# (a batch that does not divide the residual's batch axes under weight-gathered layouts, or the
# first axis of a batch-sharded KV cache; batch padding is issue 16's): no head count, kv_heads
# or vocabulary is ever refused. 3 x 200 examples (one of them grouped-query only, one attn=batch
# only), about 60 s in all.

from hypothesis import HealthCheck  # noqa: E402

from partition_helpers import any_head_cases, check_any_heads  # noqa: E402

ANY = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@ANY
@given(any_head_cases())
def test_spmd_any_heads_any_mesh_1(case):
    check_any_heads(case, SpmdExecutor, TOL, "SPMD")


@ANY
@given(any_head_cases().filter(lambda c: c[0].attention == "grouped"))
def test_spmd_any_heads_any_mesh_grouped(case):
    check_any_heads(case, SpmdExecutor, TOL, "SPMD")


@ANY
@given(any_head_cases().filter(lambda c: c[3] == "batch"))
def test_spmd_any_heads_any_mesh_attn_batch(case):
    check_any_heads(case, SpmdExecutor, TOL, "SPMD")


@pytest.mark.parametrize("name", ["6h-2kv-x2y2-default", "8h-2kv-1d-ws-batch", "6h-3kv-2d-ws-heads"])
def test_spmd_grouped_query_cases_from_the_issue(name):
    """The three refusals of issue 11 (tests/test_partition_jax.py ISSUE_CASES runs them under JAX)."""
    from test_partition_jax import ISSUE_CASES

    heads, kv, mesh, ffn, attn = ISSUE_CASES[name]
    model = ModelSpec("s-gqa-issue", layers=2, d_model=16, heads=heads, kv_heads=kv, d_head=4, d_ff=32, vocab=30,
                      block="serial", mlp="swiglu", norm="rmsnorm")
    check_any_heads((model, mesh, ffn, attn, "decode", 4, 3, 2, "auto"), SpmdExecutor, TOL, "SPMD")
