"""Layouts that do not fit: LayoutError naming the dim, its size, the axes and the options; and
pad-heads, the paper's fix for heads that do not divide (PaLM 540B: 48 -> 64 heads on 64 chips
where the layout shards them over all 64, none where it shards them over 16).
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from compiler.cli import main
from compiler.driver import build_for, compile_config, compile_module, default_pipeline, head_multiple
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec, apply_overrides, load_spec
from ir.errors import LayoutError
from partition_helpers import (MESH_8, build, check_layout_error, compile_layout, expected_layout_problems,
                               padded_heads, rel_err, run_pair, spec_for)
from runtime.generate import ReferenceExecutor, generate
from runtime.spmd import SpmdExecutor
from runtime.weights import random_tokens, random_weights

from conftest import EXAMPLES

MQA4 = ModelSpec("e-mqa", layers=1, d_model=32, heads=4, kv_heads=1, d_head=8, d_ff=64, vocab=64, block="parallel")
GQA = ModelSpec("e-gqa", layers=1, d_model=32, heads=8, kv_heads=2, d_head=4, d_ff=64, vocab=64)
MHA = ModelSpec("e-mha", layers=1, d_model=32, heads=8, kv_heads=8, d_head=4, d_ff=64, vocab=64)


def layout_error(model, mesh, ffn, attn, batch=8, pad=False, kv="shard") -> LayoutError:
    with pytest.raises(LayoutError) as ei:
        compile_layout(model, batch, 2, 4, mesh, ffn, attn, pad=pad, kv=kv)
    return ei.value


def names(err: LayoutError, dim: str, size: int, axes: str, devices: int) -> None:
    """The message names the dim and its size, the axes (as the layout orders them) and the
    device count; the hint names at least one option."""
    assert f"dim {dim}={size} does not divide over {{{axes}}} ({devices} devices)" in err.message, err.message
    assert err.hint and re.search(r"--\w+|pad-heads|kv=replicate", err.hint), err.hint


# ---- each kind of size ----------------------------------------------------------------------------


GQA62 = ModelSpec("e-gqa62", layers=1, d_model=32, heads=6, kv_heads=2, d_head=4, d_ff=64, vocab=64)
MESH_4 = (("x", 2), ("y", 2))


def test_grouped_heads_shard_jointly_k_then_g():
    """K=2 kv heads x G=4 queries on the 2D-WS head axes (z, y): K over z (the prefix it
    divides), G over y; the KV cache under attn=heads is K-sharded over z and replicated over y.
    The program equals the float64 reference on the SPMD simulator."""
    sharded = compile_layout(GQA, 8, 2, 4, MESH_8, "2d-ws", "heads")
    fn = sharded.function("decode")
    wq = fn.param("wq").type
    assert (wq.dim("K").axes, wq.dim("G").axes, wq.dim("E").axes) == (("z",), ("y",), ("x",))
    assert fn.param("wk").type.dim("K").axes == ("z",) and fn.param("k_cache").type.dim("K").axes == ("z",)
    got, ref = run_pair(sharded, GQA, 8, 2, 2, SpmdExecutor, seed=1)
    assert rel_err(got, ref) <= 1e-9


def test_query_groups_do_not_divide():
    """K=2 takes x of the 1D-WS head axes (x, y); G=3 does not divide y: without padding
    (kv=shard) that is refused, naming G and offering kv=pad."""
    err = layout_error(GQA62, MESH_4, "1d-ws", "heads")
    names(err, "G", 3, "y", 2)
    assert "kv=pad" in err.hint
    check_layout_error(err, expected_layout_problems(GQA62, 8, MESH_4, "1d-ws", "heads"), MESH_4)
    # K/V replicated: G=4 over all 8 devices of 1D-WS
    err = layout_error(GQA, MESH_8, "1d-ws", "heads", kv="replicate")
    names(err, "G", 4, "x,y,z", 8)


@pytest.mark.parametrize("ffn,axes,n", [("1d-ws", "x,y,z", 8), ("2d-ws", "z,y", 4)])
def test_heads_do_not_divide_without_pad_heads(ffn, axes, n):
    model = ModelSpec("e-mqa3", layers=1, d_model=32, heads=3, kv_heads=1, d_head=8, d_ff=64, vocab=64)
    err = layout_error(model, MESH_8, ffn, "heads")
    names(err, "H", 3, axes, n)
    assert "%wq" in err.message
    assert "pad-heads" in err.hint


def test_batch_does_not_divide_for_batch_sharded_attention():
    """Batch-sharded attention needs the batch to divide at least the first of its axes (unless
    pad-dims pads it: the default pipeline does, tests/test_pad_dims.py)."""
    err = layout_error(MQA4, MESH_8, "2d-ws", "batch", batch=3)
    names(err, "B", 3, "z", 2)
    assert "KV cache" in err.message and "--attn heads" in err.hint


@pytest.mark.parametrize("ffn,batch,axes", [("2d-ws", 4, ("z", "y")), ("1d-ws", 2, ("x",)), ("1d-ws", 4, ("x", "y")),
                                             ("wg-x", 4, ("x", "y"))])
def test_batch_sharded_attention_over_some_axes(ffn, batch, axes):
    """A batch that does not divide every device is sharded over the longest prefix of the
    cache's axes it divides, the cache replicated over the rest (KV bytes per chip: total over
    that prefix); the result equals the reference."""
    sharded = compile_layout(MQA4, batch, 3, 5, MESH_8, ffn, "batch", pad=True)
    cache = sharded.function("decode").param("k_cache").type
    assert cache.dim("B").axes == axes
    got, ref = run_pair(sharded, MQA4, batch, 3, 2, SpmdExecutor, seed=batch)
    assert rel_err(got, ref) <= 1e-9


@pytest.mark.parametrize("mesh,ffn,batch,split,axes", [
    ((("x", 8),), "1d-ws", 4, (("x", 4), ("x_1", 2)), ("x",)),
    ((("x", 8),), "1d-ws", 6, (("x", 2), ("x_1", 4)), ("x",)),
    ((("x", 2), ("y", 4)), "2d-ws", 2, (("x", 2), ("y", 2), ("y_1", 2)), ("y",)),
    ((("x", 4), ("y", 1), ("z", 2)), "1d-ws", 2, (("x", 2), ("x_1", 2), ("y", 1), ("z", 2)), ("x",)),
], ids=["x8-b4", "x8-b6", "2d-y4-b2", "x4y1z2-b2"])
def test_batch_smaller_than_the_first_cache_axis_splits_it(mesh, ffn, batch, split, axes):
    """attn=batch with a batch that does not fill the first axis of the cache's batch order:
    the axis becomes two sub-axes (a reshape of the device mesh), the cache's batch shards over
    the major one (gcd(batch, size) devices) and replicates over the minor; shard's statistics
    say so, and the program equals the reference. A batch sharing no factor with the axis is
    still refused (test_batch_does_not_divide_for_batch_sharded_attention)."""
    raw = build(MQA4, batch, 2, 4, mesh)
    res = compile_module(raw, f"pad-heads,shard{{ffn={ffn},attn=batch}},insert-collectives,cleanup")
    assert res.module.mesh == split
    assert res.module.function("decode").param("k_cache").type.dim("B").axes == axes
    (a, s), = [(a, s) for a, s in mesh if dict(split).get(a) != s]
    assert any(k.startswith(f"mesh axis {a}={s} split into") for k in res.run.records[1].stats)
    assert not expected_layout_problems(MQA4, batch, mesh, ffn, "batch", pad=True)
    got, ref = run_pair(res.module, MQA4, batch, 2, 2, SpmdExecutor, seed=batch)
    assert rel_err(got, ref) <= 1e-9


@pytest.mark.parametrize("ffn,axes,n", [("wg-x", "x", 2), ("wg-xy", "x,y", 4), ("wg-xyz", "x,y,z", 8)])
def test_batch_does_not_divide_for_weight_gathered(ffn, axes, n):
    err = layout_error(MQA4, MESH_8, ffn, "heads", batch=3)  # the default pipeline pads it instead
    names(err, "B", 3, axes, n)
    assert "residual stream" in err.message and "--ffn" in err.hint


def test_d_model_and_d_ff_do_not_divide():
    m = ModelSpec("e-odd", layers=1, d_model=36, heads=8, kv_heads=1, d_head=4, d_ff=64, vocab=64)
    err = layout_error(m, (("x", 8),), "2d-ws", "heads")
    names(err, "E", 36, "x", 8)
    m = ModelSpec("e-odd", layers=1, d_model=32, heads=8, kv_heads=1, d_head=4, d_ff=36, vocab=64)
    err = layout_error(m, MESH_8, "1d-ws", "heads")
    names(err, "F", 36, "x,y,z", 8)
    assert "%w_" in err.message


def test_vocab_that_does_not_divide_is_padded_or_replicated():
    """The default pipeline pads a vocabulary that does not divide the devices with zero rows
    (61 -> 64: the embedding and output head stay vocab-parallel) and splits the padded logits
    off before returning; a bare shard pipeline keeps the table whole on every device. Both
    equal the reference, with the true V."""
    m = ModelSpec("e-vocab", layers=1, d_model=32, heads=8, kv_heads=1, d_head=4, d_ff=64, vocab=61,
                  block="parallel", tie_embeddings=False)
    padded = compile_layout(m, 8, 2, 4, MESH_8, "2d-ws", "batch", pad=True)
    fn = padded.function("prefill")
    assert fn.param("embed").type.dim("V").axes == ("x", "y", "z") and fn.param("embed").type.size("V") == 64
    assert fn.param("lm_head").type.size("V") == 64 and fn.result_types[0].size("V") == 61
    whole = compile_layout(m, 8, 2, 4, MESH_8, "2d-ws", "batch")
    fn = whole.function("prefill")
    assert fn.param("embed").type.dim("V").axes == () and fn.param("lm_head").type.dim("V").axes == ()
    for mod in (padded, whole):
        got, ref = run_pair(mod, m, 8, 2, 2, SpmdExecutor)
        assert got.shape == ref.shape == (8, 4, 61)
        assert rel_err(got, ref) <= 1e-9


# ---- the hint's options resolve the error -------------------------------------------------------------


#: name -> (model, mesh, ffn, attn, batch, pad, kv, [(option text in the hint, changed settings)])
HINT_CASES = {
    # multiquery heads 4 on 8 devices, 1D-WS, no padding: pad-heads fixes it (--attn batch would
    # not: wq/wo are split over the heads in every attention layout, so the hint must not offer it)
    "mqa-heads": (MQA4, MESH_8, "1d-ws", "heads", 8, False, "shard",
                  [("pad-heads", dict(pad=True))]),
    # grouped-query G=3 over y after K=2 took x (1D-WS on 2x2): padding the heads works
    "gqa-groups": (GQA62, MESH_4, "1d-ws", "heads", 8, False, "shard", [("kv=pad", dict(kv="pad"))]),
    # grouped-query with the K/V heads replicated, G=4 over 8 devices (1D-WS): padding works
    "gqa-replicated": (GQA, MESH_8, "1d-ws", "heads", 8, False, "replicate", [("kv=pad", dict(kv="pad"))]),
    # a batch that does not divide (the default pipeline pads it; a bare shard pipeline refuses)
    "batch-cache": (MQA4, MESH_8, "2d-ws", "batch", 3, False, "shard",
                    [("--attn heads", dict(attn="heads")), ("--batch", dict(batch=8))]),
    "batch-residual": (MQA4, MESH_8, "wg-xyz", "heads", 4, False, "shard",
                       [("--ffn", dict(ffn="wg-xy")), ("batch", dict(batch=8))]),
}


@pytest.mark.parametrize("name", sorted(HINT_CASES))
def test_hint_options_resolve_the_error(name):
    """Each option the hint names, applied alone, makes the error it was given for go away
    (the layout compiles, or at least no longer fails on the same dim of the same tensor)."""
    model, mesh, ffn, attn, batch, pad, kv, options = HINT_CASES[name]
    err = layout_error(model, mesh, ffn, attn, batch=batch, pad=pad, kv=kv)
    first = err.message.split(" does not divide")[0]
    useless = []
    for text, change in options:
        assert text in err.hint, f"the hint does not offer {text!r}: {err.hint}"
        s = dict(model=model, mesh=mesh, ffn=ffn, attn=attn, batch=batch, pad=pad, kv=kv) | change
        try:
            compile_layout(s["model"], s["batch"], 2, 4, s["mesh"], s["ffn"], s["attn"], pad=s["pad"], kv=s["kv"])
        except LayoutError as e2:
            if e2.message.split(" does not divide")[0] == first:
                useless.append(f"{text!r} leaves the same error: {e2.message}")
    assert not useless, f"hint {err.hint!r} for {err.message!r}:\n" + "\n".join(useless)


# ---- through the command line -------------------------------------------------------------------------


CLI_CASES = {
    "query-groups": (["examples/tiny-gqa.model", "--mesh", "x=2,y=2", "--set", "model.heads=6", "--set",
                      "serve.kv=shard"], "G=3", "{y}"),
    "heads": (["examples/tiny-mqa.model", "--passes", "shard{ffn=1d-ws,attn=heads},insert-collectives"],
              "H=4", "{x,y,z}"),
    # what the default pipeline pads (pad-dims) is refused with --no-pad
    "batch": (["examples/tiny-mqa.model", "--batch", "3", "--no-pad"], "B=3", "{z}"),
    "residual": (["examples/tiny-mqa.model", "--batch", "2", "--ffn", "wg-xy", "--attn", "heads", "--no-pad"],
                 "B=2", "{x,y}"),
    "d_model": (["examples/tiny-mha.model", "--set", "model.d_model=62", "--ffn", "2d-ws", "--no-pad"], "E=62", "{x}"),
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_layout_error_exit_1_no_traceback(name, capsys, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    argv, dim, axes = CLI_CASES[name]
    rc = main(["compile", *argv, "--emit", "none"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert err.startswith("layout error: "), err
    assert f"dim {dim} does not divide over {axes}" in err
    assert "\n  hint: " in err


#: The refusals issue 11 reported, as command lines on examples/tiny-gqa.model (8 heads, 2 KV heads).
ISSUE_CLI = {
    "6h-2kv-x2y2-default": ["--mesh", "x=2,y=2", "--set", "model.heads=6"],
    "8h-2kv-1d-ws-batch": ["--mesh", "x=2,y=2,z=2", "--ffn", "1d-ws", "--attn", "batch"],
    "6h-3kv-2d-ws-heads": ["--mesh", "x=2,y=2,z=2", "--ffn", "2d-ws", "--attn", "heads", "--set", "model.heads=6",
                           "--set", "model.kv_heads=3"],
}


@pytest.mark.parametrize("name", sorted(ISSUE_CLI))
def test_cli_compiles_the_grouped_query_cases_of_the_issue(name, capsys, monkeypatch):
    """`einshard compile` with the default kv = auto: exit 0 (the programs equal the reference in
    tests/test_partition_spmd.py and, under JAX, tests/test_partition_jax.py)."""
    monkeypatch.chdir(EXAMPLES.parent)
    rc = main(["compile", "examples/tiny-gqa.model", *ISSUE_CLI[name], "--emit", "none"])
    out, err = capsys.readouterr()
    assert rc == 0, err


@pytest.mark.parametrize("heads,kv,mesh,ffn,attn", [
    (6, 3, MESH_8, "2d-ws", "heads"),  # only pad is legal
    (8, 2, MESH_4, "1d-ws", "heads"),  # all three are legal
    (8, 4, MESH_8, "2d-ws", "batch"),
])
def test_kv_auto_takes_the_fastest_legal_candidate(heads, kv, mesh, ffn, attn):
    """kv = auto compiles shard, replicate and pad through the default pipeline and keeps the one
    the cost model prices fastest (fitting; ties in that order); LayoutErrors are skipped."""
    from compiler.cost.autolayout import resolve_kv
    from compiler.cost.efficiency import efficiency_for
    from compiler.cost.hardware import get_chip
    from compiler.cost.model import nominal_params, price

    model = ModelSpec("auto-gqa", layers=2, d_model=32, heads=heads, kv_heads=kv, d_head=4, d_ff=64, vocab=64)
    base = Spec(model, MeshSpec(mesh), ServeSpec(phase="decode", batch=8, seq=16, ffn=ffn, attn=attn, kv="auto",
                                                 hardware="tpu-v4"))
    chip = get_chip("tpu-v4")
    keys = {}
    for i, choice in enumerate(("shard", "replicate", "pad")):
        s = replace(base, serve=replace(base.serve, kv=choice))
        try:
            raw = build_for(s, compile_config(s))
            m = compile_module(raw, default_pipeline(s)).module
        except LayoutError:
            continue
        e = price(m, chip, nominal_params(raw), efficiency_for(chip.name), s.serve.overlap)
        keys[choice] = (not e.fits, e.step_time_s, e.memory.total, i)
    assert keys
    assert resolve_kv(base, chip).serve.kv == min(keys, key=keys.__getitem__)
    assert "pad" in keys  # padding always compiles
    if (heads, kv) == (6, 3):  # K=3 divides none of z, y; G=2 not z,y: shard and replicate refuse
        assert set(keys) == {"pad"}


# ---- pad-heads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    ModelSpec("pad-mqa", layers=2, d_model=32, heads=6, kv_heads=1, d_head=8, d_ff=64, vocab=48, block="parallel",
              mlp="swiglu"),
    ModelSpec("pad-mha", layers=2, d_model=32, heads=6, kv_heads=6, d_head=4, d_ff=48, vocab=40, block="serial",
              mlp="gelu", bias="all"),
], ids=["mqa", "mha"])
def test_pad_heads_keeps_outputs_identical(model):
    """Reference interpreter on the padded module (6 -> 8 heads, zero W_q / W_o rows, zero K/V
    heads for MHA) vs the unpadded one, prefill + decode: the padded heads contribute exact
    zeros, so the logits agree to rounding of the (reordered) float64 contractions."""
    batch, prompt, steps = 3, 4, 3
    mod = build(model, batch, prompt, prompt + steps)
    padded = compile_module(mod, "pad-heads{multiple=8}").module
    fn = padded.function("prefill")
    assert fn.param("wq").type.size("H") == 8 and fn.param("wo").type.size("H") == 8
    if model.attention == "multihead":
        assert fn.param("k_cache").type.size("H") == 8
    weights = random_weights(mod.function("prefill"), seed=3)
    tokens = random_tokens(batch, prompt + steps, model.vocab, seed=3)
    ref = generate(ReferenceExecutor(mod), weights, tokens, prompt)
    got = generate(ReferenceExecutor(padded), weights, tokens, prompt)
    assert got.prefill_logits.shape == ref.prefill_logits.shape and got.decode_logits.shape[1] == steps
    assert rel_err(got.logits, ref.logits) <= 1e-12
    # and sharded after padding, on the simulator
    sharded = compile_layout(model, 8, prompt, prompt + steps, MESH_8, "2d-ws", "heads", pad=True)
    g, r = run_pair(sharded, model, 8, prompt, steps, SpmdExecutor)
    assert rel_err(g, r) <= 1e-9


@pytest.mark.parametrize("opts,k,g,v", [("kv_heads=4", 4, 2, 30), ("groups=3", 3, 3, 30),
                                         ("kv_heads=6,groups=4,vocab=8", 6, 4, 32), ("vocab=7", 3, 2, 35)])
def test_pad_heads_grouped_and_vocab_keep_outputs_identical(opts, k, g, v):
    """Grouped-query K=3 x G=2 with a vocabulary of 30 (Llama-like: serial, SwiGLU, RMSNorm,
    biases on the projections): zero K/V heads, zero query heads inside every group and zero
    vocabulary rows leave prefill + decode logits equal to the unpadded module's (reference
    interpreter, checkpoint weights zero-padded at load by runtime/weights.py fit_to_params)."""
    model = ModelSpec("pad-gqa", layers=2, d_model=16, heads=6, kv_heads=3, d_head=4, d_ff=32, vocab=30,
                      block="serial", mlp="swiglu", norm="rmsnorm", bias="all")
    batch, prompt, steps = 2, 3, 2
    mod = build(model, batch, prompt, prompt + steps)
    padded = compile_module(mod, f"pad-heads{{{opts}}}").module
    fn = padded.function("prefill")
    wq = fn.param("wq").type
    assert (wq.size("E"), wq.size("K"), wq.size("G"), wq.size("D")) == (16, k, g, 4)
    assert fn.param("k_cache").type.size("K") == k and fn.param("embed").type.size("V") == v
    assert fn.result_types[0].size("V") == 30
    weights = random_weights(mod.function("prefill"), seed=4)
    tokens = random_tokens(batch, prompt + steps, model.vocab, seed=4)
    ref = generate(ReferenceExecutor(mod), weights, tokens, prompt)
    got = generate(ReferenceExecutor(padded), weights, tokens, prompt)
    assert got.logits.shape == ref.logits.shape
    assert rel_err(got.logits, ref.logits) <= 1e-12


def test_pad_heads_is_a_no_op_when_heads_divide():
    mod = build(MHA, 2, 2, 4, MESH_8)
    run = compile_module(mod, "pad-heads").run
    assert run.module == mod
    assert run.records[0].stats == {"heads already divide": 8}


#: PaLM 540B on x=4,y=4,z=4 per layout: the pad-heads multiple of the default pipeline (None: none).
PALM_PADDING = {
    ("2d-ws", "batch"): None,  # heads over the wide axes z,y only: 48 % 16 == 0
    ("wg-xy", "batch"): None,  # the weight-gathered layouts share 2D-WS's weight storage
    ("2d-ws", "heads"): None,  # attention over heads too: only z,y shard the heads
    ("wg-x", "heads"): None,
    ("1d-ws", "batch"): 64,  # 1D-WS splits the heads of the weights over all 64
    ("1d-ws", "heads"): 64,
}


@pytest.mark.parametrize("ffn,attn", sorted(PALM_PADDING), ids=["-".join(k) for k in sorted(PALM_PADDING)])
def test_palm_540b_pads_heads_only_as_far_as_the_layout_shards_them(ffn, attn):
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), ffn=ffn, attn=attn)
    assert spec.model.heads == 48 and spec.mesh.n_devices == 64
    want = PALM_PADDING[ffn, attn]
    assert head_multiple(spec) == (want or 16)
    pipeline = default_pipeline(spec, rewrites=False)
    if want is None:
        assert "pad-heads" not in pipeline, pipeline
        assert pipeline.startswith(f"shard{{ffn={ffn},attn={attn}}},")
    else:
        assert pipeline.startswith(f"pad-heads{{multiple={want}}},shard{{ffn={ffn},attn={attn}}},"), pipeline
    # the rewrites do not change the padding
    assert ("pad-heads" in default_pipeline(spec)) == (want is not None)


@pytest.mark.parametrize("ffn", ["wg-x", "wg-xy", "wg-xyz"])
def test_weight_gathered_layouts_keep_the_output_head_vocab_parallel(ffn):
    """PaLM 540B decode on 4x4x4: the weight-gathered layouts used to all-gather the whole
    [V, E] table (8.79 GiB in bf16) onto every chip and repeat the logits einsum on every
    replica of the batch; now the table stays V-sharded and the [B, 1, E] activation moves."""
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), ffn=ffn, attn="batch")
    res = compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec, rewrites=False))
    fn = res.module.function("decode")
    assert fn.param("embed").type.dim("V").axes == ("x", "y", "z")
    gathered = [op for op in fn.ops if op.kind == "all_gather" and op.operands[0] == "embed"]
    assert not gathered, gathered
    (logits,) = [op for op in fn.ops if op.kind == "einsum" and op.spec == "BLE,VE->BLV"]
    assert logits.operands[1] == "embed" and logits.type.dim("V").axes == ("x", "y", "z")
    assert logits.type.local_nbytes(res.module.mesh_sizes) * 64 == logits.type.nbytes()


def test_palm_540b_2d_ws_batch_keeps_48_heads_on_4x4x4():
    """The example's own layout (the paper's decode setting): 3 heads per chip of the 16 that
    share an x coordinate, no padded weights, and the KV cache 1/64 per chip over batch."""
    spec = load_spec(EXAMPLES / "palm-540b.model")
    assert (spec.serve.ffn, spec.serve.attn) == ("2d-ws", "batch")
    raw = build_for(spec, compile_config(spec))
    res = compile_module(raw, default_pipeline(spec, rewrites=False))
    fn = res.module.function("decode")
    wq = fn.param("wq").type
    assert wq.size("H") == 48 and wq.dim("H").axes == ("z", "y") and wq.dim("E").axes == ("x",)
    assert wq.local_shape(res.module.mesh_sizes) == (118, 18432 // 4, 48 // 16, 256)
    kc = fn.param("k_cache").type
    assert kc.dim("B").axes == ("z", "y", "x") and kc.local_nbytes(res.module.mesh_sizes) * 64 == kc.nbytes()
    weights = [p.type.nbytes() for p in fn.params_with_role("weight")]
    assert weights == [p.type.nbytes() for p in raw.function("decode").params_with_role("weight")]


def test_palm_540b_pads_48_to_64_heads_under_1d_ws():
    """1D-WS splits the heads over all 64 chips: the paper's padding, 48 -> 64, one head per chip.
    2D-WS with attention over heads shards them over z,y only (16 devices) and keeps 48."""
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), ffn="1d-ws", attn="heads")
    pipeline = default_pipeline(spec, rewrites=False)
    raw = build_for(spec, compile_config(spec))
    res = compile_module(raw, pipeline)
    assert res.run.records[0].spelled == "pad-heads{multiple=64}"
    assert res.run.records[0].stats.get("heads padded 48 -> 64") == 1
    fn = res.module.function("decode")
    wq = fn.param("wq").type
    assert wq.size("H") == 64 and wq.dim("H").axes == ("x", "y", "z") and wq.dim("E").axes == ()
    assert wq.local_shape(res.module.mesh_sizes) == (118, 18432, 64 // 64, 256)
    two_d = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), attn="heads", sets=["model.kv_heads=48"])
    assert "pad-heads" not in default_pipeline(two_d, rewrites=False)
    # §3 derived check: padding adds 118 * 2 * E * 16 * 256 parameters (about 17.8B)
    added = sum(p.type.nbytes() for p in fn.params_with_role("weight")) // 2 - sum(
        p.type.nbytes() for p in raw.function("decode").params_with_role("weight")) // 2
    assert added == 118 * 2 * 18432 * 16 * 256


@pytest.mark.parametrize("model", [
    MQA4, ModelSpec("e-mha4", layers=1, d_model=32, heads=4, kv_heads=4, d_head=4, d_ff=64, vocab=64, block="serial"),
], ids=["mqa", "mha"])
def test_heads_dividing_the_wide_axes_are_not_padded_and_match_the_reference(model):
    """4 heads on x=2,y=2,z=2 under 2D-WS with attention over batch: the heads divide the 4
    devices of z,y that shard them but not the 8 of the mesh. The default pipeline leaves them
    alone (also under attn=heads), and the program compiles and equals the float64 reference on
    the SPMD simulator; under 1D-WS the same model is padded to 8."""
    spec = spec_for(model, MESH_8, "2d-ws", "batch", 8, phase="decode")
    assert head_multiple(spec) == 4 and "pad-heads" not in default_pipeline(spec)
    assert "pad-heads" not in default_pipeline(spec_for(model, MESH_8, "2d-ws", "heads", 8))
    assert default_pipeline(spec_for(model, MESH_8, "1d-ws", "heads", 8)).startswith("pad-heads{multiple=8},")
    assert padded_heads(model, MESH_8, "2d-ws", "batch", pad=True) == 4
    assert not expected_layout_problems(model, 8, MESH_8, "2d-ws", "batch", pad=True)
    sharded = compile_layout(model, 8, 2, 4, MESH_8, "2d-ws", "batch", pad=True)
    wq = sharded.function("prefill").param("wq").type
    assert wq.size("H") == 4 and wq.dim("H").axes == ("z", "y")
    got, ref = run_pair(sharded, model, 8, 2, 2, SpmdExecutor, seed=5)
    assert got.shape == ref.shape == (8, 4, 64)
    assert rel_err(got, ref) <= 1e-9


def test_batch_sharded_attention_over_some_axes_jax():
    from runtime.lower_jax import JaxExecutor

    sharded = compile_layout(MQA4, 4, 3, 5, MESH_8, "2d-ws", "batch", pad=True)
    got, ref = run_pair(sharded, MQA4, 4, 3, 2, JaxExecutor, seed=4)
    assert rel_err(got, ref) <= 1e-4
