"""Expert parallelism and expert slicing as layouts: the SPMD simulator and JAX on 8 simulated
devices reproduce the float64 reference of the unpartitioned MoE model.

Experts over 1, 2 and 3 mesh axes, with the remaining axes slicing each expert's F (expert
slicing) or none left (pure expert parallelism), and no expert axes at all (every expert sliced
over every device); under the dense layouts the attention and shared expert keep (1d-ws, 2d-ws,
wg-xy). Batch 4 (tokens spread over the expert axes) and batch 1 (decode tokens replicated: no
all-to-all). Tolerance 1e-9 normwise as in test_partition_spmd.py (observed ~1e-15).
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from compiler.pipelines import compile_module
from ir.model import ModelSpec
from passes.ledger import ledger
from partition_helpers import build, rel_err, run_pair
from runtime.spmd import SpmdExecutor

TOL = 1e-9
MESH3 = (("x", 2), ("y", 2), ("z", 2))


def moe_model(shared: bool = True, **kw) -> ModelSpec:
    base = dict(layers=2, d_model=16, heads=8, kv_heads=8, d_head=4, d_ff=16, vocab=32, mlp="swiglu", norm="rmsnorm",
                experts=8, top_k=2, norm_topk=True, expert_d_ff=8, shared_experts=int(shared), shared_gate=shared)
    return ModelSpec("moe", **{**base, **kw})


def compiled(model: ModelSpec, mesh, ffn: str, experts: str, batch: int = 4):
    mod = build(model, batch, 3, 5, mesh)
    return compile_module(mod, f"shard{{ffn={ffn},attn=heads,experts={experts}}},insert-collectives,cleanup").module


# (mesh, expert axes): experts over 1, 2, 3 axes with and without slicing, and slicing only
LAYOUTS = [
    (MESH3, "x"), (MESH3, "z"), (MESH3, "x+y"), (MESH3, "x+y+z"), (MESH3, "none"),
    ((("x", 8),), "x"), ((("x", 2), ("y", 4)), "y"), ((("x", 2), ("y", 4)), "x+y"),
]


def _ids(case) -> str:
    mesh, experts = case
    return ",".join(f"{a}={s}" for a, s in mesh) + "/" + experts


@pytest.mark.parametrize("case", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("ffn", ["1d-ws", "2d-ws"])
def test_spmd_equals_reference(case, ffn: str) -> None:
    mesh, experts = case
    model = moe_model()
    got, ref = run_pair(compiled(model, mesh, ffn, experts), model, 4, 3, 2, SpmdExecutor)
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("experts", ["x", "x+y+z", "none"])
@pytest.mark.parametrize("ffn, batch", [("1d-ws", 1), ("wg-xy", 4)])
def test_spmd_batch_and_weight_gathered(experts: str, ffn: str, batch: int) -> None:
    """Batch 1: the tokens cannot be spread, every device dispatches all of them to its own
    experts (no all-to-all). Weight-gathered: the expert weights still stay put."""
    model = moe_model(shared=False, router="topk-softmax", norm_topk=False)
    sharded = compiled(model, MESH3, ffn, experts, batch)
    got, ref = run_pair(sharded, model, batch, 3, 2, SpmdExecutor)
    assert rel_err(got, ref) <= TOL
    for fn in sharded.functions:
        for op in fn.ops:
            if op.kind == "all_gather" and "we_" in " ".join(op.operands):
                raise AssertionError(f"an expert weight was gathered: {op}")


@pytest.mark.slow  # 30-60 s each on the loaded 2-core machine (JAX compiles prefill and decode)
@pytest.mark.parametrize("experts", ["x", "x+y", "x+y+z", "none"])
def test_jax_equals_reference(experts: str) -> None:
    from runtime.lower_jax import JaxExecutor

    model = moe_model(router="sigmoid-topk")
    got, ref = run_pair(compiled(model, MESH3, "1d-ws", experts), model, 4, 3, 2, JaxExecutor)
    assert rel_err(got, ref) <= 1e-4  # JAX computes in float32 (the tolerance of test_partition_jax.py)


def test_ledger_lists_the_all_to_all_pair() -> None:
    """Per layer: one all-to-all to the experts and one back, over the expert axes, each moving the
    local [X, C, E] buffer: X=8 experts x C=(4*3 tokens)/2 slots x E (16 floats; E/2 on the way back,
    after the F partial sum was reduce-scattered over the slicing axis)."""
    model = moe_model(shared=False)
    sharded = compiled(model, (("x", 2), ("y", 2)), "1d-ws", "x", 4)
    a2a = [e for e in ledger(sharded) if e.kind == "all_to_all" and e.function == "prefill_layer"]
    to = [e for e in a2a if "we_gate" in e.reason]
    back = [e for e in a2a if e.reason.startswith("combine")]
    assert len(to) == 1 and len(back) == 1, [e.reason for e in a2a]
    assert to[0].axes == back[0].axes == ("x",)
    assert to[0].bytes_per_device == 8 * 6 * 16 * 4
    assert back[0].bytes_per_device == 8 * 6 * 8 * 4
    assert to[0].repeats == back[0].repeats == model.layers


@pytest.mark.parametrize("experts", ["x+y", "x+y+z"])
def test_spmd_one_long_prompt_spreads_tokens_over_L(experts: str) -> None:
    """Batch 1, prompt 8: the dispatch slices the prompt's positions over the expert axes (C over
    them), so prefill still exchanges tokens with one all-to-all each way."""
    model = moe_model()
    mod = build(model, 1, 8, 10, MESH3)
    sharded = compile_module(mod, f"shard{{ffn=1d-ws,attn=heads,experts={experts}}},insert-collectives,cleanup").module
    ops = [op for op in sharded.function("prefill_layer").ops]
    disp = next(op for op in ops if op.kind == "dispatch")
    assert disp.types[0].dim("C").axes == tuple(experts.split("+"))
    assert sum(op.kind == "all_to_all" and "we_gate" in op.reason for op in ops) == 1
    got, ref = run_pair(sharded, model, 1, 8, 2, SpmdExecutor)
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("qk_norm", ["head", "all"])
@pytest.mark.parametrize("kv_heads", [2, 8])
def test_spmd_qk_norm(qk_norm: str, kv_heads: int) -> None:
    """Qwen3's per-head and OLMoE's all-heads QK-norm under sharded heads (K over x, G over y, z)."""
    model = moe_model(qk_norm=qk_norm, kv_heads=kv_heads, d_head=8)
    got, ref = run_pair(compiled(model, MESH3, "1d-ws", "x"), model, 4, 3, 2, SpmdExecutor)
    assert rel_err(got, ref) <= TOL


def test_explain_prices_every_expert_layout_and_auto_takes_the_fastest() -> None:
    """compiler/cost/moe.py: every subset of the mesh axes whose devices divide the experts, and
    none; auto (compiler/driver.py resolved) keeps the fastest that fits."""
    from dataclasses import replace

    from compiler.cost.explain import explain, to_json
    from compiler.cost.hardware import get_chip
    from compiler.driver import resolved
    from compiler.spec import MeshSpec, ServeSpec, Spec

    model = moe_model(shared=False, experts=4, top_k=2, heads=4, kv_heads=4)
    spec = Spec(model, MeshSpec((("x", 2), ("y", 2))), ServeSpec(phase="decode", batch=8, seq=16, ffn="1d-ws", attn="heads",
                                                 hardware="tpu-v4"))
    chip = get_chip("tpu-v4")
    rows = to_json(spec, chip, explain(spec, chip, ("decode",)))["expert_layouts"]["decode"]
    axes = {r["expert_axes"] for r in rows}
    assert axes == {"none", "x", "y", "x+y"}
    legal = [r for r in rows if r["legal"]]
    assert [r["step_s"] for r in legal] == sorted(r["step_s"] for r in legal)
    assert next(r for r in rows if r["expert_axes"] == "none")["all_to_all_bytes_per_step"] == 0
    assert all(r["all_to_all_bytes_per_step"] > 0 for r in legal if r["expert_axes"] != "none")
    assert all(r["dropless_padding"] == pytest.approx(4 / 2) for r in legal)  # X / k
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0] is legal[0]
    assert resolved(spec).serve.expert_axes == legal[0]["expert_axes"]
    assert resolved(replace(spec, serve=replace(spec.serve, expert_axes="y"))).serve.expert_axes == "y"


def test_capacity_drops_the_same_assignments_under_every_layout_and_counts_them() -> None:
    """capacity_factor = 0.5: each sequence gets ceil(0.5 x 4 tokens x 2 / 8) = 1 slot per expert, so
    some assignments are dropped (the logits move away from the dropless ones); the count is
    reported (runtime.kernels_moe.DROPPED), and since the capacity is per sequence the sharded
    programs drop the same assignments as the reference: equal logits and equal counts."""
    from compiler.build import BuildConfig, build_module
    from runtime.generate import ReferenceExecutor, generate
    from runtime.kernels_moe import DROPPED
    from runtime.weights import random_tokens, random_weights

    model = moe_model(shared=False)
    batch, prompt, steps = 4, 4, 2
    cfg = BuildConfig(batch, prompt, prompt + steps, ("prefill", "decode"), "f32", "all", capacity_factor=0.5)
    ref_mod = build_module(model, cfg)
    disp = next(op for op in ref_mod.function("prefill_layer").ops if op.kind == "dispatch")
    assert disp.capacity == batch * 1
    weights = random_weights(ref_mod.function("prefill"), seed=3)
    tokens = random_tokens(batch, prompt + steps, model.vocab, seed=3)
    dropless = generate(ReferenceExecutor(build(model, batch, prompt, prompt + steps)), weights, tokens, prompt)
    assert DROPPED.take() == 0
    ref = generate(ReferenceExecutor(ref_mod), weights, tokens, prompt)
    dropped = DROPPED.take()
    assert 0 < dropped < model.layers * batch * prompt * model.top_k
    assert rel_err(ref.logits, dropless.logits) > 1e-3
    for experts in ("x", "x+y+z", "none"):
        mod = build_module(model, cfg, MESH3)
        sharded = compile_module(mod, f"shard{{ffn=1d-ws,attn=heads,experts={experts}}},insert-collectives,cleanup")
        got = generate(SpmdExecutor(sharded.module), weights, tokens, prompt)
        assert rel_err(got.logits, ref.logits) <= TOL, experts
        assert DROPPED.take() == dropped, experts


CAPACITY_SPEC = """model capmoe {
  layers = 2
  d_model = 16
  heads = 8
  kv_heads = 8
  d_head = 4
  d_ff = 16
  vocab = 32
  mlp = swiglu
  norm = rmsnorm
  experts = 8
  top_k = 2
  expert_d_ff = 8
}
serve {
  batch = 4
  seq = 8
  capacity_factor = 0.5
}
"""


@pytest.mark.slow  # one JAX compile of prefill + decode on 8 devices (~20 s on the loaded machine)
def test_run_reports_the_drops_of_jax_and_the_reference(tmp_path, capsys) -> None:
    import json

    from compiler.cli import main

    path = tmp_path / "cap.model"
    path.write_text(CAPACITY_SPEC)
    rc = main(["run", str(path), "--mesh", "x=2,y=2,z=2", "--set", "serve.expert_axes=x,y", "--check", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"]
    dropped = out["moe_dropped_assignments"]
    assert dropped["jax"] == dropped["reference"] > 0


@pytest.mark.parametrize("value, ok", [("dropless", True), ("1.25", True), ("0", False), ("abc", False)])
def test_capacity_setting(value: str, ok: bool) -> None:
    from compiler.spec import ServeSpec
    from ir.errors import SpecError

    if ok:
        assert ServeSpec(capacity_factor=value).capacity_factor == value
    else:
        with pytest.raises(SpecError, match="capacity_factor must be dropless or a positive number"):
            ServeSpec(capacity_factor=value)


@st.composite
def moe_cases(draw):
    """Random MoE models x meshes of up to 8 devices x FFN layouts x expert axes (any subset of the
    mesh axes, or none) x batch; a dropless dispatch must equal the reference, a capacity too."""
    axes = draw(st.sampled_from([(("x", 2),), (("x", 4),), (("x", 2), ("y", 2)), (("x", 2), ("y", 4)), MESH3]))
    experts = draw(st.sampled_from([2, 4, 8]))
    names = [a for a, _ in axes]
    subset = [a for a in names if draw(st.booleans())]
    model = moe_model(shared=draw(st.booleans()), experts=experts, top_k=draw(st.integers(1, min(3, experts))),
                      router=draw(st.sampled_from(["softmax-topk", "topk-softmax", "sigmoid-topk"])),
                      norm_topk=draw(st.booleans()), router_bias=draw(st.booleans()),
                      expert_d_ff=draw(st.sampled_from([8, 16])))
    return (model, axes, draw(st.sampled_from(["1d-ws", "2d-ws", "wg-x"])), "+".join(subset) or "none",
            draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([0.0, 0.0, 0.75])))


@settings(max_examples=40, deadline=None)
@given(moe_cases())
def test_spmd_equals_reference_random(case) -> None:
    from compiler.build import BuildConfig, build_module
    from ir.errors import LayoutError
    from runtime.generate import ReferenceExecutor, generate
    from runtime.weights import random_tokens, random_weights

    model, mesh, ffn, experts, batch, cf = case
    cfg = BuildConfig(batch, 3, 5, ("prefill", "decode"), "f32", "all", capacity_factor=cf)
    try:
        sharded = compile_module(build_module(model, cfg, mesh),
                                 f"shard{{ffn={ffn},attn=heads,experts={experts}}},insert-collectives,cleanup").module
    except LayoutError as e:
        # the experts do not divide their axes, or the batch / heads do not divide the layout's axes
        assert f"{model.experts} experts do not divide" in e.message or "dim B=" in e.message, e.message
        event("refused: " + ("experts" if "experts do not divide" in e.message else "batch"))
        return
    ref_mod = build_module(model, cfg)
    weights = random_weights(ref_mod.function("prefill"), seed=batch)
    tokens = random_tokens(batch, 5, model.vocab, seed=batch)
    ref = generate(ReferenceExecutor(ref_mod), weights, tokens, 3)
    got = generate(SpmdExecutor(sharded), weights, tokens, 3)
    assert rel_err(got.logits, ref.logits) <= TOL
    event(f"ran {ffn}, capacity {cf or 'dropless'}")
