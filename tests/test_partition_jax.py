"""The partitioned programs under JAX: shard_map on the simulated 8-device CPU mesh vs the reference.

The same cases as tests/test_partition_spmd.py, but executed by runtime.lower_jax.JaxExecutor
(every entry jitted inside ``jax.shard_map`` with ``check_vma``), against the float64 reference
interpreter on the unpartitioned module.

Tolerance: 1e-4 normwise (max |jax - ref| / max |ref|), the f32 tolerance of ``einshard run
--check``. JAX computes in float32 (unit roundoff 6e-8; contractions of <= 64 terms, softmax and
norms over <= 2 layers, with psum'd partial sums in a different order than the reference): observed
errors are 1e-7 .. 1e-6. A missing or wrong collective gives O(1) errors (a partial sum not
reduced, a shard multiplied by the wrong block), so 1e-4 leaves 100x headroom and still catches
every layout bug.

Each example jits two entries (prefill, decode), about 1-2 s of XLA compilation on the CPU
machine (less with the persistent cache tests/conftest.py sets up), so the big grid and the
random sweep are marked slow.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from compiler.spec import ModelSpec
from partition_helpers import ATTN_LAYOUTS, FFN_LAYOUTS, MESH_8, cases, check_partitioned, expected_layout_problems

TOL = 1e-4


def jax_executor(module):
    from runtime.lower_jax import JaxExecutor

    return JaxExecutor(module)


def check_case(*case) -> None:
    check_partitioned(case, jax_executor, TOL, "JAX")


MODELS = {
    "mqa-parallel-swiglu": ModelSpec("j-mqa", layers=2, d_model=32, heads=8, kv_heads=1, d_head=8, d_ff=64, vocab=48,
                                     block="parallel", mlp="swiglu", norm="layernorm", tie_embeddings=True),
    "mha-serial-gelu-bias": ModelSpec("j-mha", layers=2, d_model=32, heads=8, kv_heads=8, d_head=4, d_ff=64,
                                      vocab=40, block="serial", mlp="gelu", norm="layernorm", bias="all"),
    "gqa-serial-rms": ModelSpec("j-gqa", layers=2, d_model=32, heads=16, kv_heads=8, d_head=4, d_ff=32, vocab=32,
                                block="serial", mlp="gelu-tanh", norm="rmsnorm", bias="mlp",
                                rotary_style="interleaved"),
}

# The paper's two headline configurations (2D-WS decode with batch-sharded multiquery attention;
# XYZ-WG prefill with attention over batch) and a padded-heads case run in the quick suite.
QUICK = [
    ("mqa-parallel-swiglu", "2d-ws", "batch", "decode"),
    ("mqa-parallel-swiglu", "wg-xyz", "batch", "prefill"),
    ("mha-serial-gelu-bias", "1d-ws", "heads", "decode"),
]


@pytest.mark.parametrize("name,ffn,attn,phase", QUICK, ids=["-".join(q) for q in QUICK])
def test_jax_matches_reference_quick(name, ffn, attn, phase):
    model = MODELS[name]
    assert not expected_layout_problems(model, 8, MESH_8, ffn, attn)
    check_case(model, MESH_8, ffn, attn, phase, 8, 3, 0 if phase == "prefill" else 2, False, "shard")


def test_jax_matches_reference_padded_heads():
    """6 heads padded to 8 by the default pipeline, 2D-WS, attention over heads, prefill + decode."""
    model = ModelSpec("j-pad", layers=2, d_model=32, heads=6, kv_heads=1, d_head=4, d_ff=32, vocab=32,
                      block="parallel", mlp="gelu")
    check_case(model, MESH_8, "2d-ws", "heads", "decode", 8, 2, 2, True, "shard")


#: The rest of the grid (the quick cases are not repeated).
GRID = [(n, f, a) for n in sorted(MODELS) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS
        if (n, f, a, "decode") not in QUICK]


@pytest.mark.slow
@pytest.mark.parametrize("name,ffn,attn", GRID, ids=["-".join(g) for g in GRID])
def test_jax_grid_8_devices(name, ffn, attn):
    """Every FFN x attention layout, three attention kinds, on x=2,y=2,z=2, prefill + decode."""
    model = MODELS[name]
    assert not expected_layout_problems(model, 8, MESH_8, ffn, attn)
    check_case(model, MESH_8, ffn, attn, "decode", 8, 3, 2, False, "shard")


# Random models on the other meshes (1-3 axes, 2-8 devices).
OTHER_MESHES = ((("x", 8),), (("x", 2), ("y", 4)), (("x", 4), ("y", 2)), (("x", 4),), (("x", 2), ("y", 2)),
                (("x", 4), ("y", 1), ("z", 2)))


@pytest.mark.slow
@settings(max_examples=30)
@given(cases(divisible=True, attention=("mha", "mqa", "gqa"), meshes=OTHER_MESHES))
def test_jax_random_models_and_meshes(case):
    check_case(*case)


# ---- issue 11 §1: grouped-query models that were refused, and every head count on every mesh ----

from hypothesis import HealthCheck  # noqa: E402

from partition_helpers import (any_head_cases, check_any_heads, compile_layout, refusals, rel_err,  # noqa: E402
                               run_pair)

#: (heads, kv_heads, mesh, ffn, attn): refused before K x G were sharded jointly and padded.
ISSUE_CASES = {
    "6h-2kv-x2y2-default": (6, 2, (("x", 2), ("y", 2)), "1d-ws", "heads"),  # G=3 padded to 4
    "8h-2kv-1d-ws-batch": (8, 2, MESH_8, "1d-ws", "batch"),  # K over x, G over y,z
    "6h-3kv-2d-ws-heads": (6, 3, MESH_8, "2d-ws", "heads"),  # K=3 padded to 4 over z,y
}


@pytest.mark.slow  # 12-20 s each on the CPU machine; the SPMD twins run in the quick suite
@pytest.mark.parametrize("name", sorted(ISSUE_CASES))
def test_jax_grouped_query_cases_from_the_issue(name):
    """Llama-like GQA (SwiGLU, RMSNorm, serial block) with kv = auto, prefill + 2 decode steps."""
    heads, kv, mesh, ffn, attn = ISSUE_CASES[name]
    model = ModelSpec("j-gqa-issue", layers=2, d_model=16, heads=heads, kv_heads=kv, d_head=4, d_ff=32, vocab=30,
                      block="serial", mlp="swiglu", norm="rmsnorm")
    check_any_heads((model, mesh, ffn, attn, "decode", 4, 3, 2, "auto"), jax_executor, TOL, "JAX")


@pytest.mark.slow  # about 5 s per example on the 2-core CPU machine
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(any_head_cases().filter(lambda c: not refusals(c[5], c[1], c[2], c[3])))
def test_jax_any_heads_any_mesh(case):
    """60 configurations of the SPMD property test (tests/test_partition_spmd.py) under JAX, all
    of them outside the refusal table: every one runs."""
    check_any_heads(case, jax_executor, TOL, "JAX")


def test_jax_batch_smaller_than_the_mesh_axis():
    """attn=batch, 1D-WS, batch 4 on x=8: the axis is split into x=4 x x_1=2 (a reshape of the
    device mesh); the cache's batch shards over x and replicates over x_1."""
    model = MODELS["mqa-parallel-swiglu"]
    sharded = compile_layout(model, 4, 2, 4, (("x", 8),), "1d-ws", "batch")
    assert sharded.mesh == (("x", 4), ("x_1", 2))
    assert sharded.function("decode").param("k_cache").type.dim("B").axes == ("x",)
    got, ref = run_pair(sharded, model, 4, 2, 2, jax_executor, seed=2)
    assert rel_err(got, ref) <= TOL
