"""Pipeline stages (issue 12 §2): a ``stage`` mesh axis splits the layer stack; the numpy SPMD
simulator and JAX must equal the unpartitioned reference with every FFN layout inside a stage,
in both phases (prefill, then decode steps that read the staged KV cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from compiler.driver import build_for, compile_module, default_pipeline, run_config, unsharded_pipeline
from compiler.spec import apply_overrides, load_spec
from ir.errors import LayoutError, SpecError
from ir.parser import parse_module
from ir.printer import print_module
from ir.verifier import verify
from passes.layouts import FFN_LAYOUTS
from passes.ledger import ledger, repeats_of
from passes.pipeline_stages import auto_microbatches, stage_layers
from runtime.generate import ReferenceExecutor, generate
from runtime.spmd import SpmdExecutor
from runtime.weights import random_tokens, random_weights

ROOT = Path(__file__).resolve().parent.parent
# (a folder of its own: tests/test_golden.py reads every *.ir directly in tests/golden as a pass case)
GOLDEN = ROOT / "tests" / "golden" / "stages" / "tiny-mqa_decode.ir"
#: stage count -> the mesh (8 devices) with the axes inside a stage
MESHES = {2: "stage=2,x=2,y=2", 4: "stage=4,x=2"}
STEPS = 2


def _spec(mesh: str, ffn: str = "2d-ws", attn: str = "batch", mb: str = "auto", example: str = "tiny-mqa"):
    # batch 16: 4 micro-batches of a batch sharded over the 4 devices of a stage (attn = batch)
    return apply_overrides(load_spec(ROOT / "examples" / f"{example}.model"), mesh=mesh, ffn=ffn, attn=attn,
                           batch=16, sets=[f"serve.microbatches={mb}"])


def _compiled(spec):
    cfg = run_config(spec, STEPS)
    module = build_for(spec, cfg)
    pipe = default_pipeline(spec)
    return cfg, module, pipe, compile_module(module, pipe)


def _logits(spec, executor: str = "spmd") -> tuple[np.ndarray, np.ndarray]:
    cfg, module, pipe, res = _compiled(spec)
    w = random_weights(module.function("prefill"))
    tokens = random_tokens(cfg.batch, cfg.prompt_len + STEPS, spec.model.vocab)
    same = compile_module(module, unsharded_pipeline(pipe)).module
    ref = generate(ReferenceExecutor(same), w, tokens, cfg.prompt_len).logits
    if executor == "spmd":
        got = generate(SpmdExecutor(res.module), w, tokens, cfg.prompt_len).logits
    else:
        from runtime.lower_jax import JaxExecutor

        got = generate(JaxExecutor(res.module), w, tokens, cfg.prompt_len).logits
    return got, ref


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
@pytest.mark.parametrize("stages", sorted(MESHES))
def test_spmd_equals_reference(stages: int, ffn: str) -> None:
    """float64 simulator: only reassociation may separate it from the reference."""
    got, ref = _logits(_spec(MESHES[stages], ffn, mb="4:2"))
    assert _rel(got, ref) < 1e-12


@pytest.mark.parametrize("attn", ["heads", "batch"])
def test_spmd_attention_layouts_and_auto_microbatches(attn: str) -> None:
    got, ref = _logits(_spec(MESHES[4], "1d-ws", attn, mb="auto", example="tiny-gqa"))
    assert _rel(got, ref) < 1e-12


@pytest.mark.slow  # 20-30 s of XLA compile each on this CPU
@pytest.mark.parametrize("stages", sorted(MESHES))
def test_jax_equals_reference(stages: int) -> None:
    got, ref = _logits(_spec(MESHES[stages], "2d-ws", mb="4:2"), "jax")
    assert _rel(got, ref) < 1e-4  # f32 on device against the float64 reference (compiler/run.py)


@pytest.mark.slow
@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
@pytest.mark.parametrize("stages", sorted(MESHES))
def test_jax_every_ffn_layout(stages: int, ffn: str) -> None:
    got, ref = _logits(_spec(MESHES[stages], ffn, mb="auto"), "jax")
    assert _rel(got, ref) < 1e-4


def test_identity_layers_pad_the_stack() -> None:
    """tiny-mqa has 2 layers: 4 stages hold one each after 2 identity layers are added, and the
    pass statistics say so."""
    _, _, _, res = _compiled(_spec(MESHES[4], mb="2:4"))
    stats = {k: v for r in res.run.records for k, v in r.stats.items()}
    assert stats["identity layers added"] == 2 and stats["layers per stage"] == 1
    assert stats["@prefill micro-batches"] == 2 and stats["@decode micro-batches"] == 4
    m = res.module
    assert m.mesh[0] == ("stage", 4)
    w = m.function("decode").param("w_out_fused").type
    assert w.dims[0].size == 4 and w.dims[0].axes == ("stage",)
    assert stage_layers(2, 4) == (1, 2) and stage_layers(30, 4) == (8, 2) and stage_layers(8, 4) == (2, 0)


def test_ledger_prices_the_schedule() -> None:
    """The ppermute runs once per schedule step (M + S - 1) with one micro-batch's activations;
    the layers run N / S times per step on each device."""
    spec = _spec(MESHES[2], "1d-ws", mb="4:2")
    cfg, _, _, res = _compiled(spec)
    m = res.module
    reps = repeats_of(m)
    assert reps["prefill_stage"] == 4 + 2 - 1 and reps["decode_stage"] == 2 + 2 - 1
    assert reps["prefill_layer"] == 5 * 1 and reps["decode_layer"] == 3 * 1
    perms = {e.function: e for e in ledger(m) if e.kind == "ppermute"}
    E = spec.model.d_model
    # prefill: [B/4, L, E] over 4 devices of x,y (1d-ws keeps E sharded over all inner axes)
    assert perms["prefill_stage"].bytes_per_device == (cfg.batch // 4) * cfg.prompt_len * (E // 4) * 4
    assert perms["prefill_stage"].repeats == 5 and perms["decode_stage"].repeats == 3
    assert perms["prefill_stage"].axes == ("stage",)


def test_golden_ir_and_round_trip() -> None:
    spec = apply_overrides(_spec(MESHES[2], "1d-ws", "heads", mb="2:2"), phase="decode")
    from compiler.driver import compile_config

    module = build_for(spec, compile_config(spec))
    text = print_module(compile_module(module, default_pipeline(spec)).module)
    if os.environ.get("EINSHARD_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    back = parse_module(text)
    verify(back)
    assert print_module(back) == text


def test_microbatches_that_do_not_divide_are_refused() -> None:
    with pytest.raises(LayoutError, match="micro-batches"):
        _compiled(_spec(MESHES[2], mb="16:2"))  # 16 rows in 4 row blocks (B over x, y)
    # the residual stream keeps B whole, but attention inside the layer shards it over x, y
    spec = apply_overrides(_spec(MESHES[2], "1d-ws", "batch", mb="8:2", example="tiny-gqa"), batch=8)
    with pytest.raises(LayoutError, match="inside a layer"):
        _compiled(spec)


def test_microbatches_setting_is_checked() -> None:
    with pytest.raises(SpecError, match="PREFILL:DECODE"):
        _spec(MESHES[2], mb="4-2")
    assert _spec(MESHES[2], mb="8:4").serve.microbatches == "8:4"


def test_auto_microbatches_is_the_hybrid_schedule() -> None:
    # decode: as many as stages; prefill: up to 4x as many; both divide the rows
    assert auto_microbatches(8, 1, 1, 2, "decode") == 2 and auto_microbatches(8, 1, 1, 2, "prefill") == 8
    assert auto_microbatches(6, 1, 1, 4, "decode") == 3 and auto_microbatches(64, 1, 1, 3, "prefill") == 8
    assert auto_microbatches(1, 1, 1, 4, "decode") == 1
    # rows per row block: 16 rows in 2 blocks allow 8; a layer sharding B over 4 devices caps it at 4
    assert auto_microbatches(16, 2, 1, 4, "prefill") == 8 and auto_microbatches(16, 2, 4, 4, "prefill") == 4


# ---- cost model ---------------------------------------------------------------------------------


def test_host_links_price_collectives_that_span_hosts() -> None:
    from compiler.cost.hardware import CHIPS

    a100 = CHIPS["a100-80g"]
    mesh = {"stage": 3, "x": 8}  # a stage per DGX node of 8 GPUs
    assert a100.crosses_hosts(("stage",), mesh) and not a100.crosses_hosts(("x",), mesh)
    assert a100.crosses_hosts(("x",), {"x": 16}) and not a100.crosses_hosts(("x",), {"x": 8})
    nbytes = 1 << 20
    assert a100.collective_seconds(nbytes, ("stage",), mesh) == nbytes / 25e9  # InfiniBand HDR per GPU
    assert a100.collective_seconds(nbytes, ("x",), mesh) == nbytes / 300e9  # NVLink
    assert CHIPS["h100-80g"].dcn_bw == 50e9 and CHIPS["h100-80g"].host_devices == 8


def test_explain_prices_fastertransformer_configurations() -> None:
    """MT-NLG 530B on A100s as FasterTransformer ran it (TP16, TP32, PP3/TP8), decode at batch
    64: all three compile, fit and are priced; the ppermute of PP3/TP8 crosses InfiniBand once
    per schedule step with one micro-batch's activations (bf16, E over the 8 GPUs of a stage)."""
    from compiler.cost.hardware import CHIPS
    from compiler.cost.staging import stage_candidates

    base = apply_overrides(load_spec(ROOT / "examples" / "mt-nlg-530b.model"), mesh="stage=3,x=8", phase="decode",
                           batch=64, seq=148, ffn="1d-ws", attn="heads")
    a100 = CHIPS["a100-80g"]
    pp = {c.label: c for c in stage_candidates(base, a100, "bound")}
    pp3 = pp["stage=3,x=8"]
    assert pp3.estimate is not None and pp3.estimate.fits
    assert (pp3.stages, pp3.microbatches, pp3.steps) == (3, 2, 4)  # auto: the largest M <= S dividing 64
    assert pp3.bubble == pytest.approx(2 / 4)
    per_step = (64 // 2) * (20480 // 8) * 2
    assert pp3.ppermute_s == pytest.approx(4 * per_step / 25e9)
    assert pp3.estimate.step_time_s == pytest.approx(4 * pp3.stage_step_s, rel=0.05)  # + embed, logits
    # a stage axis of size 1 lists tensor parallelism over all the chips (and pipelines of them)
    tp = {mesh: stage_candidates(apply_overrides(base, mesh=f"stage=1,{mesh}"), a100, "bound")
          for mesh in ("x=16", "x=32")}
    from compiler.cost.staging import fastest_stage

    fit = [c for c in pp.values() if c.estimate and c.estimate.fits]
    assert fastest_stage(list(pp.values())) is min(fit, key=lambda c: c.estimate.step_time_s)  # type: ignore[union-attr]
    # decode: by the time per token of the K-token call generate runs
    assert fastest_stage(list(pp.values()), "decode") is min(fit, key=lambda c: c.gen_token_s())
    for mesh, cands in tp.items():
        (c,) = [c for c in cands if c.stages == 1 and c.label == mesh]
        assert c.estimate is not None and c.estimate.fits
        # tensor parallelism over 2 or 4 nodes: its all-reduces cross InfiniBand every layer
        assert c.estimate.per_step.comm_exposed > 10 * pp3.estimate.per_step.comm_exposed



def test_generated_pipeline_docs_are_current() -> None:
    """docs/pipeline.md and the schedule diagram in docs/distributed.md come from docs/generate_pipeline.py."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "docs" / "generate_pipeline.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from gen_helpers import tiny

    return tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.slow  # ~30 s of XLA compile per mesh, cold
@pytest.mark.parametrize("mesh", [MESHES[2], MESHES[4]])
def test_generate_on_stages_gives_the_transformers_tokens(llama, mesh: str) -> None:
    """Greedy tokens of 8 prompts (micro-batched prefill and decode) on pipeline stages equal
    transformers' (and so one device's), row by row."""
    from compiler.generation import make_runner
    from gen_helpers import PROMPTS
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + i] for i in range(8)]
    spec = apply_overrides(llama.spec, mesh=mesh, ffn="1d-ws", attn="heads")
    gen = Generator(make_runner(spec, llama.weights, 64, batch=8))
    got = gen.generate(GenerateRequest.of(prompts, SamplingParams(), 8)).tokens
    assert got == [llama.want(p, 8) for p in prompts]


def test_staged_spec_round_trips_through_its_text() -> None:
    from compiler.spec import format_spec, parse_spec

    spec = _spec(MESHES[2], mb="8:4")
    text = format_spec(spec)
    assert "microbatches = 8:4" in text.replace("  ", " ")
    back = parse_spec(text)
    assert (back.model, back.mesh, back.serve) == (spec.model, spec.mesh, spec.serve)
    # without stages the setting is left out of the canonical text (it parses back to auto)
    assert "microbatches" not in format_spec(apply_overrides(spec, mesh="x=2", sets=["serve.microbatches=auto"]))


def test_pass_refuses_a_module_that_already_has_the_stage_axis() -> None:
    from ir.errors import PassError
    from passes.pipeline_stages import PipelineStages

    _, _, _, res = _compiled(_spec(MESHES[2], "1d-ws", mb="2:2"))
    with pytest.raises(PassError, match="already has"):
        PipelineStages(stages=2).run(res.module)


def test_verifier_checks_the_stage_body_signature() -> None:
    """A pipeline whose body expects another micro-batch size is refused by type inference."""
    from dataclasses import replace as dc_replace

    from ir.errors import VerifyError

    _, _, _, res = _compiled(_spec(MESHES[2], "1d-ws", mb="2:2"))
    m = res.module
    entry = m.function("decode")
    bad = [dc_replace(op, microbatches=4) if op.kind == "pipeline" else op for op in entry.ops]
    with pytest.raises(VerifyError, match="body @decode_stage takes"):
        verify(m.with_function(entry.with_ops(bad)))


def test_prefill_sends_only_the_last_position_across_stages() -> None:
    """logits = last: the stage all_reduce comes after the split of the last position."""
    spec = _spec(MESHES[2], "1d-ws", mb="2:2")
    cfg, _, _, res = _compiled(spec)
    (e,) = [e for e in ledger(res.module) if e.function == "prefill" and e.kind == "all_reduce" and e.axes == ("stage",)]
    assert e.bytes_per_device == 2 * cfg.batch * 1 * (spec.model.d_model // 4) * 4


@pytest.mark.slow  # ~1 min of XLA compile, cold
def test_serving_engine_on_stages_gives_the_one_device_tokens() -> None:
    """The serving engine (slots, chunked prefill, compaction, sampled and greedy rows, stop ids)
    on stage=2,x=2,y=2 gives every request the tokens it gets alone on one device."""
    from test_serving_engine import Clock, Model, replay, request

    from runtime.serving.engine import Engine
    from runtime.serving.scheduler import SchedulerConfig

    staged, one = Model(MESHES[2], attn="batch"), Model("1")
    rng = np.random.default_rng(3)
    trace = [(t, request(i, rng.integers(0, 128, n), temp, k, p, i, m, stop))
             for i, (t, n, temp, k, p, m, stop) in enumerate([
                 (0, 20, 0.0, 0, 1.0, 9, ()), (0, 3, 0.7, 5, 1.0, 12, (3,)), (1, 13, 1.5, 0, 0.8, 4, ()),
                 (2, 1, 0.0, 0, 1.0, 14, (37, 105)), (2, 24, 0.7, 0, 1.0, 6, ())])]
    clock = Clock()
    tokens, *_ = replay(Engine(staged.runner, SchedulerConfig(slots=4, chunk=8, step_tokens=32), clock=clock),
                       clock, trace)
    assert {r.id: tokens[r.id] for _, r in trace} == {r.id: one.alone(r) for _, r in trace}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(16))
def test_random_stage_configurations_equal_the_reference(seed: int) -> None:
    """Random stage counts, inner meshes, layouts, models, batches and micro-batch counts that the
    row blocks allow: the simulator equals the reference (float64) in prefill and decode."""
    rng = np.random.default_rng(seed)
    for _ in range(20):  # the first draw whose layout the model takes (refusals: test_layout_errors.py)
        stages = int(rng.choice([2, 4]))
        inner = "x=2,y=2" if stages == 2 else str(rng.choice(["x=2", "x=1"]))
        example = str(rng.choice(["tiny-mqa", "tiny-gqa", "tiny-mha", "tiny-gptj"]))
        ffn, attn = str(rng.choice(FFN_LAYOUTS)), str(rng.choice(["heads", "batch"]))
        batch = int(rng.choice([4, 8, 12, 16]))
        spec = apply_overrides(_spec(f"stage={stages},{inner}", ffn, attn, "auto", example), batch=batch)
        try:
            res = _compiled(spec)[3]
            break
        except LayoutError:
            continue
    else:
        raise AssertionError("no legal configuration in 20 draws")
    rows = [op for f in res.module.entries for op in f.ops if op.kind == "pipeline"]
    counts = [d for d in range(1, batch + 1) if all(batch % (d * op.blocks) == 0 for op in rows)]
    for m in rng.permutation(counts):  # a count the layer's own B sharding refuses says so
        try:
            spec = apply_overrides(spec, sets=[f"serve.microbatches={m}:{m}"])
            _compiled(spec)
            break
        except LayoutError as e:
            assert "inside a layer" in e.message
    got, ref = _logits(spec)
    assert _rel(got, ref) < 1e-12, (stages, inner, example, ffn, attn, batch, m)
