"""DeepSpeed's generation schedule (issue 12 §2): K tokens per row in one call, the pipeline kept
full across tokens (``pipeline_generate``, passes/pipeline_generate.py). Three levels: the IR
(golden text, round trip, ledger), the numpy SPMD simulator against a one-device reference loop
(tokens and KV caches, greedy and sampled, M below, at and above the stage count), and JAX
through the generation loop against one device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.generation import module_for
from compiler.spec import apply_overrides, load_spec
from ir.module import Function
from ir.parser import parse_module
from ir.pipeline_ops import PipelineGenerate
from ir.printer import print_module
from ir.verifier import verify
from passes.ledger import repeats_of
from runtime.generate import ReferenceExecutor, prepared_weights, zero_caches
from runtime.pipelined_generate import cut_rows
from runtime.spmd import SpmdExecutor
from runtime.weights import random_weights

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "stages" / "tiny-mqa_generate.ir"
CTX, PROMPT = 16, 4


def _spec(mesh: str, mb: str = "auto", example: str = "tiny-mqa"):
    return apply_overrides(load_spec(ROOT / "examples" / f"{example}.model"), mesh=mesh,
                           sets=[f"serve.microbatches={mb}"])


def _gen_op(module) -> PipelineGenerate:
    return next(op for op in module.function("decode").ops if isinstance(op, PipelineGenerate))


def _samp(B: int, temperature: float) -> dict[str, np.ndarray]:
    return {"temperature": np.full(B, temperature, np.float32), "top_k": np.full(B, 20 if temperature else 0, np.int32),
            "top_p": np.full(B, 0.9 if temperature else 1.0, np.float32), "seed": np.arange(B, dtype=np.int32) + 7}


def _prefill(ex, w, prompt):
    B = prompt.shape[0]
    wp = prepared_weights(ex, w)
    names = [p.name for p in ex.module.function("prefill").params_with_role("cache")]
    pos = np.broadcast_to(np.arange(PROMPT, dtype=np.int32), (B, PROMPT)).copy()
    out = ex.call("prefill", {**wp, **zero_caches(ex.module, "prefill"), "tokens": prompt, "pos": pos})
    return np.asarray(out[0])[:, -1], dict(zip(names, out[1:]))


def _pick(logits: np.ndarray, pos: int, samp: dict[str, np.ndarray]) -> np.ndarray:
    """One device's token choice (runtime/sampling.py) for the token at ``pos``."""
    if not np.any(samp["temperature"] > 0):
        return logits.argmax(-1).astype(np.int32)
    import jax.numpy as jnp

    from runtime.sampling import sample

    B = logits.shape[0]
    return np.asarray(sample(jnp.asarray(logits, jnp.float32), samp["temperature"], samp["top_k"], samp["top_p"],
                             samp["seed"].view(np.uint32), jnp.full((B,), pos, jnp.int32)))


def _one_device(example: str, B: int, K: int, samp, seed: int = 0):
    """Prompts, weights, and the one-device reference: K tokens after the prefill's, final caches."""
    one = _spec("x=1", example=example)
    pre, dec = module_for(one, "prefill", B, PROMPT, CTX), module_for(one, "decode", B, 1, CTX)
    w = random_weights(Function("w", pre.raw_weight_params(), (), (), ()), seed)
    prompt = np.random.default_rng(seed).integers(0, one.model.vocab, (B, PROMPT)).astype(np.int32)
    logits, caches = _prefill(ReferenceExecutor(pre), w, prompt)
    tok = first = _pick(logits, PROMPT, samp)
    wd = prepared_weights(ReferenceExecutor(dec), w)
    made = []
    for r in range(K):
        out = ReferenceExecutor(dec).call("decode", {**wd, **caches, "tokens": tok[:, None],
                                                     "pos": np.full((B, 1), PROMPT + r, np.int32)})
        caches = dict(zip(caches, out[1:]))
        tok = _pick(np.asarray(out[0])[:, -1], PROMPT + r + 1, samp)
        made.append(tok)
    return prompt, w, first, np.stack(made, 1), caches


def _staged(spec, B: int, K: int, prompt, w, samp, greedy: bool):
    pre = module_for(spec, "prefill", B, PROMPT, CTX)
    gen = module_for(spec, "generate_greedy" if greedy else "generate", B, K, CTX)
    logits, caches = _prefill(SpmdExecutor(pre), w, prompt)
    first = _pick(logits, PROMPT, samp)
    ex = SpmdExecutor(gen)
    out = ex.call("decode", {**prepared_weights(ex, w), **caches, **samp, "tokens": first[:, None],
                             "pos": np.full((B, 1), PROMPT, np.int32)})
    return first, np.asarray(out[0]), dict(zip(caches, (np.asarray(c) for c in out[1:])))


@pytest.mark.parametrize("mesh,mb,B,K", [
    ("stage=2,x=2", "auto", 4, 5),        # M = S = 2
    ("stage=4,x=2", "auto", 8, 4),        # M = S = 4
    ("stage=4,x=2", "4:2", 8, 3),         # M = 2 < S: a bubble in every round
    ("stage=2,x=2,y=2", "4:4", 16, 3),    # M = 4 > S: tokens wait at stage 0
])
def test_spmd_greedy_equals_one_device(mesh: str, mb: str, B: int, K: int) -> None:
    """Tokens and every KV-cache entry the K tokens wrote equal the one-token reference loop."""
    samp = _samp(B, 0.0)
    prompt, w, first, want, ref_caches = _one_device("tiny-mqa", B, K, samp)
    got_first, got, caches = _staged(_spec(mesh, mb), B, K, prompt, w, samp, greedy=True)
    assert (got_first == first).all()
    assert got.shape == (B, K) and (got == want).all()
    assert len(set(want.ravel().tolist())) > 1  # the schedule is not checked on one repeated token
    for n, r in ref_caches.items():
        c = caches[n][: r.shape[0]]  # identity layers pad N
        assert np.abs(c - r).max() <= 1e-12 * np.abs(r).max()


def test_spmd_sampled_equals_one_device() -> None:
    """Sampled rows (temperature, top-k, top-p, per-row seeds) draw the one-device tokens: the key
    is the row's seed and the token's position, wherever the head runs."""
    B, K = 4, 4
    samp = _samp(B, 1.3)
    prompt, w, first, want, _ = _one_device("tiny-gqa", B, K, samp, seed=1)
    got_first, got, _ = _staged(_spec("stage=2,x=2", example="tiny-gqa"), B, K, prompt, w, samp, greedy=False)
    assert (got_first == first).all() and (got == want).all()
    assert len(set(want.ravel().tolist())) > 2


def test_golden_ir_round_trip_and_schedule() -> None:
    """The K-token decode entry: one pipeline_generate over @decode_embed, @decode_stage and
    @decode_head (with its sample op), its tokens all_reduced over the stage axis."""
    m = module_for(_spec("stage=2,x=2"), "generate_greedy", 4, 3, CTX)
    verify(m)
    text = print_module(m)
    assert print_module(parse_module(text)) == text
    if not GOLDEN.exists():  # regenerate: delete the file and run this test
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    op = _gen_op(m)
    assert (op.microbatches, op.tokens) == (2, 3)
    assert op.steps(2) == 2 * 2 + 2 + 2 - 1  # (K - 1) max(M, S) + M + S - 1
    dec = m.function("decode")
    assert [o.kind for o in dec.ops] == ["pipeline_generate", "all_reduce"]
    assert str(dec.result_types[0]) == "i32[B=4, L=3]"
    assert "sample" in [o.kind for o in m.function("decode_head").ops]


def test_schedule_length_and_ledger() -> None:
    """Every body runs once per schedule step; per token the pipeline takes max(M, S) steps
    against M + S - 1 for a one-token call (the fill and drain paid once per call)."""
    m = module_for(_spec("stage=4,x=2"), "generate_greedy", 8, 16, CTX)
    op = _gen_op(m)
    steps = op.steps(4)
    assert steps == 15 * 4 + 4 + 4 - 1
    reps = repeats_of(m)
    assert reps["decode_stage"] == reps["decode_head"] == reps["decode_embed"] == steps
    one = module_for(_spec("stage=4,x=2"), "decode", 8, 1, CTX)
    per_call = reps_one = repeats_of(one)["decode_stage"]
    assert per_call == 4 + 4 - 1 and steps / 16 < reps_one
    assert 1 - 16 * op.microbatches / steps < 0.1  # bubble over the call: (S - 1) / steps


def test_cut_rows_stops_where_the_one_token_loop_stops() -> None:
    first = np.array([5, 9, 2])
    made = np.array([[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert cut_rows(first, made, np.array([4, 4, 1]), (9,)) == [[5, 1, 2, 3], [9], [2]]
    assert cut_rows(first, made, np.array([2, 3, 4]), ()) == [[5, 1], [9, 4, 9], [2, 7, 8, 9]]


def test_generation_program_needs_stages() -> None:
    from ir.errors import SpecError

    with pytest.raises(SpecError, match="stage axis"):
        module_for(_spec("x=2"), "generate", 4, 3, CTX)


@pytest.mark.slow  # ~40 s of XLA compile, cold
def test_generator_on_stages_gives_the_one_device_tokens(tmp_path) -> None:
    """`generate --mesh stage=..`'s loop (JAX): greedy and sampled rows of different prompt
    lengths, budgets and a stop id give one device's tokens, made by one K-token call."""
    from compiler.generation import make_runner
    from gen_helpers import PROMPTS, tiny
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams

    llama = tiny("llama", tmp_path)
    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + i] for i in range(8)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, top_k=(0, 8)[i % 2], seed=i) for i in range(8)]
    budgets = [9, 9, 3, 9, 1, 9, 6, 9]
    want = llama.gen.generate(GenerateRequest.of(prompts, params, budgets, (7,)))
    spec = apply_overrides(llama.spec, mesh="stage=4,x=2", ffn="1d-ws", attn="heads")
    gen = Generator(make_runner(spec, llama.weights, 64, batch=8))
    got = gen.generate(GenerateRequest.of(prompts, params, budgets, (7,)))
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert list(gen.pipelined.steps.values()) == [(9 - 2) * 4 + 4 + 4 - 1]  # one call made all 8 tokens per row
    (sched,) = gen.pipelined.schedules.values()  # what `generate --json` reports as decode_schedule
    assert sched["stage_steps_per_token"] == pytest.approx(35 / 8) and sched["one_token_call_steps"] == 7


def test_explain_prices_the_schedule_generate_runs() -> None:
    """explain's decode on stages is per token of the K-token call (fill and drain once per call,
    the head every step) and `--phase generate` prices its G tokens as that one call."""
    from compiler.cost.generation import estimate_generation
    from compiler.cost.hardware import CHIPS
    from compiler.cost.staging import GENERATE_TOKENS, stage_candidates
    from ir.pipeline_ops import generate_steps

    a100 = CHIPS["a100-80g"]
    base = apply_overrides(load_spec(ROOT / "examples" / "mt-nlg-530b.model"), mesh="stage=3,x=8", phase="decode",
                           batch=64, seq=148, ffn="1d-ws", attn="heads")
    pp3 = {c.label: c for c in stage_candidates(base, a100, "bound")}["stage=3,x=8"]
    K = GENERATE_TOKENS
    assert pp3.gen_steps() == (K - 1) * 3 + 2 + 3 - 1  # M = 2 < S = 3: a bubble slot per round
    assert pp3.gen_bubble() == pytest.approx(1 - K * 2 / pp3.gen_steps())
    assert 0 < pp3.head_s < 0.05 * pp3.stage_step_s
    assert pp3.gen_token_s() == pytest.approx(pp3.gen_steps() * (pp3.stage_step_s + pp3.head_s) / K)
    assert pp3.gen_token_s() < 0.8 * pp3.estimate.step_time_s  # the one-token call: 4 steps per token
    g = estimate_generation(base, a100, 128, 20, "bound")
    assert g.decode_s == pytest.approx(generate_steps(20, 2, 3) * (pp3.stage_step_s + pp3.head_s), rel=1e-6)



@pytest.mark.slow  # ~10-25 s of XLA compile on this loaded CPU
def test_jax_equals_the_simulator() -> None:
    """The JAX lowering (shard_map, fori_loop, ppermute) runs the schedule the simulator runs:
    the same greedy tokens on two stages."""
    from runtime.lower_jax import JaxExecutor

    B, K = 2, 3
    spec = _spec("stage=2")
    gen = module_for(spec, "generate_greedy", B, K, CTX)
    pre = module_for(spec, "prefill", B, PROMPT, CTX)
    samp = _samp(B, 0.0)
    prompt, w, first, want, _ = _one_device("tiny-mqa", B, K, samp, seed=2)
    _, caches = _prefill(SpmdExecutor(pre), w, prompt)
    ex = JaxExecutor(gen)
    out = ex.call("decode", {**prepared_weights(ex, w), **{n: np.asarray(c, np.float32) for n, c in caches.items()},
                             **samp, "tokens": first[:, None], "pos": np.full((B, 1), PROMPT, np.int32)})
    assert (np.asarray(out[0]) == want).all()
