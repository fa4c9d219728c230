"""The rewrite passes on random models, meshes and layouts: the SPMD simulator equals the same
rewritten program run unsharded.

Random models (parallel and serial blocks, MHA/MQA/GQA; tests/partition_helpers.py) x meshes of
up to 8 devices x every FFN x attention layout x a subset of {fuse-parallel-block, quantize-int8
before or after shard, collective-einsum one-way or bidirectional} in a legal order
(tests/rewrite_helpers.py). The sharded program runs on the numpy SPMD simulator
(runtime/spmd.py) and must equal the float64 reference interpreter on the unsharded module
compiled with compiler.driver.unsharded_pipeline of the same pipeline (the same packing, the same
int8 weights and scales), as ``einshard run --spmd`` does.

Tolerance 1e-9 normwise (max |spmd - ref| / max |logit|), the partitioning tests' tolerance: both
sides compute in float64 with the same kernels, int8 weights are the same integers and scales on
both sides (scales reduce over a sharded dim with a pmax, which is exact), and the ring loops only
reorder the partial sums: reassociation of ~1e-16 per term. A wrong ring step, segment or scale
gives O(1e-2 .. 1) errors.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from compiler.spec import ModelSpec
from partition_helpers import ATTN_LAYOUTS, FFN_LAYOUTS, MESH_8
from rewrite_helpers import LOOPS, QUANT, rewrite_cases, run_rewrite_case
from runtime.spmd import SpmdExecutor

TOL = 1e-9


@settings(max_examples=60)
@given(rewrite_cases(attention=("mha", "mqa")))
def test_rewrites_spmd_equals_same_program_unsharded_mha_mqa(c):
    run_rewrite_case(*c, SpmdExecutor, TOL, "SPMD")


@settings(max_examples=40)
@given(rewrite_cases(attention=("gqa",)))
def test_rewrites_spmd_equals_same_program_unsharded_gqa(c):
    run_rewrite_case(*c, SpmdExecutor, TOL, "SPMD")


PARALLEL_MQA = ModelSpec("r-mqa", layers=2, d_model=32, heads=8, kv_heads=1, d_head=8, d_ff=64, vocab=40,
                         block="parallel", mlp="swiglu", norm="layernorm", tie_embeddings=True)


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("attn", ATTN_LAYOUTS)
@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
def test_rewrites_grid_8_devices(ffn, attn, quant, loops):
    """Every layout x every int8/loop choice with fusion, parallel MQA on 2x2x2, prefill + decode."""
    case = (PARALLEL_MQA, MESH_8, ffn, attn, "decode", 8, 3, 2, False, "shard")
    res = run_rewrite_case(case, (True, quant, loops), SpmdExecutor, TOL, "SPMD")
    assert res is not None
    kinds = {op.kind for f in res.module.functions for op in f.ops}
    assert "concat" in kinds, "fuse-parallel-block did not fire on a parallel block"
    assert ("dequantize" in kinds) == (quant is not None)
    if loops:
        assert "collective_einsum" in kinds, "no collective-einsum site fired"
