"""The rewrite passes under JAX (shard_map on the simulated 8-device CPU mesh).

The same cases as tests/test_rewrites_spmd.py, executed by runtime.lower_jax.JaxExecutor.

Tolerances:

* vs the float64 reference of the same rewritten program unsharded: 1e-4 normwise, the f32
  tolerance (compiler/run.py TOLERANCES["f32"]): JAX computes in float32 (unit roundoff 6e-8),
  contractions of <= a few hundred terms over <= 2 layers, observed ~1e-6. The int8 weights and
  scales are the same on both sides: quantize is computed in f32 by JAX and in float64 by the
  reference, so a weight exactly at a rounding tie could round differently; that moves one weight
  by one step (scale), far below 1e-4 of the logits for these sizes.
* int8 vs the float reference (the unquantized model): per element the dequantized weight is
  within scale/2 = max|w_row|/254 of the float weight (test_int8.py proves it), i.e. a relative
  error <= 0.4% per weight and <= 0.4% per einsum output (|sum x dw| <= sum |x| max|w|/254); through
  2 layers of norms, softmax and residual adds the logits move by a few e-3 normwise (observed
  ~1e-2 at worst); the bound asserted is compiler/run.py TOLERANCES["int8"] = 1e-1.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from compiler.spec import ModelSpec
from partition_helpers import MESH_8
from rewrite_helpers import rewrite_cases, run_rewrite_case

TOL = 1e-4
INT8_TOL = 1e-1


def jax_executor(module):
    from runtime.lower_jax import JaxExecutor

    return JaxExecutor(module)


MQA = ModelSpec("rj-mqa", layers=2, d_model=32, heads=8, kv_heads=1, d_head=8, d_ff=64, vocab=48,
                block="parallel", mlp="swiglu", norm="layernorm", tie_embeddings=True)
MHA = ModelSpec("rj-mha", layers=2, d_model=32, heads=8, kv_heads=8, d_head=4, d_ff=64, vocab=40,
                block="serial", mlp="gelu", norm="layernorm", bias="all")
GQA = ModelSpec("rj-gqa", layers=2, d_model=32, heads=16, kv_heads=8, d_head=4, d_ff=32, vocab=32,
                block="parallel", mlp="gelu-tanh", norm="rmsnorm", bias="mlp")

QUICK = [
    # the paper's decode configuration with every rewrite: fused, int8 before shard, bidirectional rings
    ("mqa", MQA, "2d-ws", "batch", (True, "before", "bidirectional")),
    # serial block (nothing to fuse), int8 after shard, one-way rings
    ("mha", MHA, "1d-ws", "heads", (True, "after", "one-way")),
    # grouped-query parallel block, weight-gathered, fused, loops over the gathered weights
    ("gqa", GQA, "wg-xy", "batch", (True, None, "one-way")),
]


@pytest.mark.parametrize("name,model,ffn,attn,rw", QUICK, ids=[f"{q[0]}-{q[2]}-{q[3]}" for q in QUICK])
def test_rewrites_jax_quick(name, model, ffn, attn, rw):
    case = (model, MESH_8, ffn, attn, "decode", 8, 3, 2, False, "shard")
    assert run_rewrite_case(case, rw, jax_executor, TOL, "JAX", INT8_TOL) is not None


@pytest.mark.slow
@settings(max_examples=12)
@given(rewrite_cases())
def test_rewrites_jax_random(c):
    run_rewrite_case(*c, jax_executor, TOL, "JAX", INT8_TOL)
