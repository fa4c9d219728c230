"""A serving prefill: logits for the last prompt position only, and a long batch's embedding.

``serve.logits = last`` (the default) makes prefill return ``[B, 1, V]``: what the next token is
sampled from. ``all`` keeps ``[B, L, V]`` for scoring. The ``[B, L, V]`` logits of a large batch
outweigh the model on a chip (PaLM 540B at 512 x 2048 on 64 chips: 8 GiB per chip in bf16).

The vocab-parallel embedding gives each device a partial sum of the whole ``[B, L, E]`` output;
for a long batch the shard pass moves the table to an E-sharded copy first (passes/shard.py
``_embed``). Both are checked three ways: golden IR (tests/golden/shard.ir for the embedding,
the build goldens for the logits), the numpy SPMD simulator and JAX on 8 simulated devices
against the float64 reference of the unsharded program.
"""

from __future__ import annotations

import json

import pytest

from compiler.build import BuildConfig, build_module
from compiler.cli import main
from compiler.driver import compile_module
from compiler.spec import apply_overrides, load_spec
from conftest import EXAMPLES
from ir.errors import SpecError
from ir.types import Dim, TensorType
from partition_helpers import FFN_LAYOUTS, MESH_8, pipeline_for, rel_err, tiny_model
from passes.shard import _columns_cheaper
from runtime.generate import ReferenceExecutor, generate
from runtime.spmd import SpmdExecutor
from runtime.weights import random_tokens, random_weights

SPMD_TOL = 1e-9
JAX_TOL = 1e-4
B, P, STEPS = 8, 4, 2


def _module(model, logits: str, mesh=()):
    return build_module(model, BuildConfig(B, P, P + STEPS, logits=logits), mesh)


def _reference_all(model, seed: int):
    """Every position's logits from the unsharded float64 reference, plus weights and tokens."""
    ref_mod = _module(model, "all")
    w = random_weights(ref_mod.function("prefill"), seed=seed)
    tokens = random_tokens(B, P + STEPS, model.vocab, seed=seed)
    return generate(ReferenceExecutor(ref_mod), w, tokens, P).logits, w, tokens


def _prefill_result(module):
    f = module.function("prefill")
    return f.value_types[f.returns[0]]


# ---- the program -------------------------------------------------------------------------------


def test_last_returns_one_position_and_all_returns_the_prompt():
    model = tiny_model("mqa")
    assert _prefill_result(_module(model, "last")).size("L") == 1
    assert _prefill_result(_module(model, "all")).size("L") == P
    kinds = [op.kind for op in _module(model, "last").function("prefill").ops]
    assert kinds.index("split") < kinds.index("norm") < kinds.index("einsum")  # norm and head on one row
    # decode has one position anyway, and a one-token prompt needs no split
    assert "split" not in [op.kind for op in _module(model, "last").function("decode").ops]
    one = build_module(model, BuildConfig(B, 1, 3, logits="last"))
    assert "split" not in [op.kind for op in one.function("prefill").ops]


def test_bad_logits_value_is_a_spec_error():
    with pytest.raises(SpecError, match="logits must be 'last' or 'all'"):
        BuildConfig(1, 2, 4, logits="first")
    spec = load_spec(EXAMPLES / "tiny-mqa.model")
    with pytest.raises(SpecError, match="logits"):
        apply_overrides(spec, sets=["serve.logits=first"])


def test_cli_compile_prefill_logits(capsys):
    base = [str(EXAMPLES / "tiny-mqa.model"), "--phase", "prefill", "--passes", ""]
    assert main(["compile", *base]) == 0
    last = capsys.readouterr().out
    assert main(["compile", *base, "--set", "serve.logits=all"]) == 0
    full = capsys.readouterr().out
    assert "%x_prompt, %x_last = split(" in last and "split(" not in full
    ret = [ln for ln in last.splitlines() if ln.startswith("  ) -> (")]  # the entry's comes first
    assert ", L=1, V=" in ret[0].split("],")[0]
    ret = [ln for ln in full.splitlines() if ln.startswith("  ) -> (")]
    assert ", L=1, V=" not in ret[0].split("],")[0]


def test_last_equals_the_last_row_of_all():
    model = tiny_model("mha", heads=4)
    ref_all, w, tokens = _reference_all(model, seed=5)
    last = generate(ReferenceExecutor(_module(model, "last")), w, tokens, P).logits
    assert last.shape == (B, 1 + STEPS, model.vocab)
    # the same arithmetic on the last row (BLAS may block a 1-row matmul differently: a few ulps)
    assert rel_err(last, ref_all[:, P - 1:]) <= 1e-13


# ---- sharded: SPMD simulator and JAX -------------------------------------------------------------


@pytest.mark.parametrize("attn", ["heads", "batch"])
@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
def test_spmd_last_logits_every_layout(ffn, attn):
    """Each layout with the default (last) logits equals the reference's last prompt row and decode
    steps; the prefill embeds 8 x 4 tokens E-sharded, decode embeds 8 x 1 vocab-parallel."""
    model = tiny_model("mqa")
    ref_all, w, tokens = _reference_all(model, seed=7)
    sharded = compile_module(_module(model, "last", MESH_8), pipeline_for(model, MESH_8, ffn, attn, True)).module
    for entry, by_columns in (("prefill", True), ("decode", False)):
        embed = next(op for op in sharded.function(entry).ops if op.kind == "embed")
        assert (embed.operands[0] != "embed") == by_columns
        assert bool(embed.types[0].partial) != by_columns
    got = generate(SpmdExecutor(sharded), w, tokens, P).logits
    assert got.shape == (B, 1 + STEPS, model.vocab)
    assert rel_err(got, ref_all[:, P - 1:]) <= SPMD_TOL


def test_jax_last_logits():
    from runtime.lower_jax import JaxExecutor

    model = tiny_model("mqa")
    ref_all, w, tokens = _reference_all(model, seed=9)
    sharded = compile_module(_module(model, "last", MESH_8), pipeline_for(model, MESH_8, "2d-ws", "batch", True))
    got = generate(JaxExecutor(sharded.module), w, tokens, P).logits
    assert rel_err(got, ref_all[:, P - 1:]) <= JAX_TOL


# ---- the embedding of a long batch -----------------------------------------------------------------


def _table(v: int, e: int, axes=("x", "y", "z")) -> TensorType:
    return TensorType("bf16", (Dim("V", v, axes), Dim("E", e)))


def _tokens(b: int, length: int) -> TensorType:
    return TensorType("i32", (Dim("B", b), Dim("L", length)))


MESH = {"x": 4, "y": 4, "z": 4}


def test_columns_cheaper_by_hand():
    """Per device: the partial B·L·E against V·E/k + B·L·E/k (PaLM 540B: V=256000, E=18432, k=64)."""
    v, e, axes = 256000, 18432, ("x", "y", "z")
    # decode, batch 64: 64 rows < 4000 + 1 table rows per device: stay vocab-parallel
    assert not _columns_cheaper(_table(v, e), _tokens(64, 1), axes, MESH)
    # prefill batch 1 x 2048: 2048 < 4000 + 32
    assert not _columns_cheaper(_table(v, e), _tokens(1, 2048), axes, MESH)
    # prefill 512 x 2048: 1048576 > 4000 + 16384
    assert _columns_cheaper(_table(v, e), _tokens(512, 2048), axes, MESH)
    # the boundary: V/k + BL/k < BL  <=>  V < BL (k - 1); V=64*63, k=64: BL=64 ties, BL=65 wins
    assert not _columns_cheaper(_table(64 * 63, 64), _tokens(64, 1), axes, MESH)
    assert _columns_cheaper(_table(64 * 63, 64), _tokens(65, 1), axes, MESH)
    # E must divide over the table's axes
    assert not _columns_cheaper(_table(v, 18430), _tokens(512, 2048), axes, MESH)
    # tokens already sharded over other axes count only their local rows
    tk = TensorType("i32", (Dim("B", 512, ("y",)), Dim("L", 2048)))
    assert _columns_cheaper(_table(v, e, ("x",)), tk, ("x",), MESH)


def test_palm_540b_long_prefill_embeds_by_columns_and_fits():
    """The compiled PaLM 540B prefill at 512 x 2048 on 64 chips: the table moves by one all-to-all
    and no op holds a [B, L, E] partial or [B, L, V] logits; some layout now fits in HBM."""
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), phase="prefill", batch=512, seq=2048,
                           ffn="wg-xyz", attn="batch", weights="bf16")
    from compiler.driver import build_for, compile_config, default_pipeline

    m = compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec)).module
    fn = m.function("prefill")
    ops = {op.result: op for op in fn.ops}
    embed = next(op for op in fn.ops if op.kind == "embed")
    moved = ops[embed.operands[0]]
    assert moved.kind == "all_to_all" and moved.operands == ("embed",)
    assert not embed.types[0].partial and embed.types[0].dim("E").axes == ("x", "y", "z")
    assert _prefill_result(m).size("L") == 1


def test_explain_palm_540b_prefill_512_fits(capsys):
    code = main(["explain", str(EXAMPLES / "palm-540b.model"), "--hardware", "tpu-v4", "--mesh", "x=4,y=4,z=4",
                 "--phase", "prefill", "--batch", "512", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    chosen = [c for c in d["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["fits"]
    assert chosen[0]["memory"]["activations_at"] != "@prefill einsum %logits"
