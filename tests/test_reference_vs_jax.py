"""The numpy float64 reference and the JAX lowering compute the same model, and the KV cache
is right: prefilling a whole sequence equals prefilling a prefix and decoding the rest.

Tolerances are normwise, ``max|got - ref| / max|ref|`` over all logits (as ``einshard run
--check`` reports them; elementwise relative error is meaningless near zero logits):

* f32 weights: **1e-5**. JAX computes in float32 with ``Precision.HIGHEST``; the unit roundoff is
  6e-8 and the longest reductions here have d_ff = 256 terms, so rounding stays around 1e-7
  to 1e-6 after two layers (measured: at most 4.2e-7 on the tiny examples). 1e-5 leaves an
  order of magnitude of margin and still catches any real semantic difference (a wrong mask,
  a rotary off by one position, a missing bias), which shows up at 1e-2 or more.
* bf16 weights: **3e-2**. Both sides get the same bf16-rounded weights, but JAX also keeps every
  activation in bf16 (8 significant bits, relative step 2^-8 = 3.9e-3) through ~15 ops per layer,
  while the reference widens everything to float64. Measured at most 9e-3 on the tiny examples;
  the bound is ~3x that, a little tighter than run's bf16 default (5e-2).
* Prefill-all vs prefix + decode, both in the float64 reference: **1e-12**. The two differ only
  in summation order (one score row against T cached keys vs the same keys in a bigger matrix),
  so they agree to a few float64 ulps (~1e-16 relative, times the reduction lengths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.build import BuildConfig, build_module
from compiler.driver import build_for, run_config
from compiler.spec import ModelSpec, apply_overrides, load_spec
from ir.module import Module
from ir.verifier import verify
from runtime.generate import ReferenceExecutor, generate
from runtime.weights import random_tokens, random_weights, round_to

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ("tiny-mqa", "tiny-gqa", "tiny-gptj", "tiny-mha")

F32_TOL = 1e-5
BF16_TOL = 3e-2
CACHE_TOL = 1e-12


def normwise(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / (np.abs(ref).max() or 1.0))


def jax_executor(module: Module):
    from runtime.lower_jax import JaxExecutor

    return JaxExecutor(module)


def tiny_setup(name: str, weights: str = "f32", steps: int = 3):
    """A tiny example at small shapes: batch 2, an 8-token prompt, then ``steps`` decode steps."""
    spec = apply_overrides(load_spec(EXAMPLES / f"{name}.model"), phase="prefill", batch=2, seq=8, weights=weights)
    cfg = run_config(spec, steps)
    module = build_for(spec, cfg)
    verify(module)
    w = round_to(random_weights(module.function("prefill"), seed=1), cfg.dtype)
    tokens = random_tokens(cfg.batch, cfg.prompt_len + steps, spec.model.vocab, seed=1)
    return spec, cfg, module, w, tokens


def compare(module: Module, weights, tokens, prompt_len: int) -> float:
    ref = generate(ReferenceExecutor(module), weights, tokens, prompt_len)
    got = generate(jax_executor(module), weights, tokens, prompt_len)
    pf = module.function("prefill")
    prefill_positions = pf.value_types[pf.returns[0]].size("L")  # the prompt, or its last position
    assert prefill_positions in (1, prompt_len)
    steps = tokens.shape[1] - prompt_len
    assert got.logits.shape == ref.logits.shape == (tokens.shape[0], prefill_positions + steps, ref.logits.shape[-1])
    assert np.isfinite(got.logits).all() and np.isfinite(ref.logits).all()
    return normwise(got.logits, ref.logits)


@pytest.mark.parametrize("name", TINY)
def test_reference_vs_jax_f32(name: str) -> None:
    _, cfg, module, w, tokens = tiny_setup(name)
    assert compare(module, w, tokens, cfg.prompt_len) <= F32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_reference_vs_jax_bf16_weights(name: str) -> None:
    """``--set serve.weights=bf16``: bf16 weights and activations on the JAX side."""
    spec, cfg, module, w, tokens = tiny_setup(name, "bf16")
    assert cfg.dtype == "bf16" and module.function("prefill").params[2].type.dtype == "bf16"
    err = compare(module, w, tokens, cfg.prompt_len)
    assert err <= BF16_TOL
    assert err > 1e-5  # it really ran in bf16


# ---- the KV cache: prefill of everything == prefill of a prefix + decode steps ----------------


def incremental(ex, weights, tokens: np.ndarray, prompt_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits at every position and the final caches, prefill then one decode call per token."""
    B, total = tokens.shape
    fn = ex.module.function("prefill")
    names = [p.name for p in fn.params_with_role("cache")]
    caches = {p.name: np.zeros(p.type.shape) for p in fn.params_with_role("cache")}
    pos = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (B, prompt_len))
    out = ex.call("prefill", {**weights, **caches, "tokens": tokens[:, :prompt_len], "pos": pos})
    logits, caches = [out[0]], dict(zip(names, out[1:]))
    for t in range(prompt_len, total):
        out = ex.call("decode", {**weights, **caches, "tokens": tokens[:, t:t + 1],
                                 "pos": np.full((B, 1), t, np.int32)})
        logits.append(out[0])
        caches = dict(zip(names, out[1:]))
    return np.concatenate(logits, axis=1), caches


def check_cache_consistency(model: ModelSpec, batch: int, prompt_len: int, steps: int, seed: int) -> None:
    total = prompt_len + steps
    inc_m = build_module(model, BuildConfig(batch, prompt_len, total, logits="all"))
    full_m = build_module(model, BuildConfig(batch, total, total, ("prefill",), logits="all"))
    w = random_weights(inc_m.function("prefill"), seed)
    tokens = random_tokens(batch, total, model.vocab, seed)
    inc_logits, inc_caches = incremental(ReferenceExecutor(inc_m), w, tokens, prompt_len)
    full_logits, full_caches = incremental(ReferenceExecutor(full_m), w, tokens, total)
    assert inc_logits.shape == full_logits.shape == (batch, total, model.vocab)
    assert normwise(inc_logits, full_logits) <= CACHE_TOL
    for name in inc_caches:
        assert normwise(inc_caches[name], full_caches[name]) <= CACHE_TOL, name
    # The cache is really used: decoding with the cache wiped gives different logits.
    ex = ReferenceExecutor(inc_m)
    _, caches = incremental(ex, w, tokens[:, :prompt_len], prompt_len)
    wiped = {k: np.zeros_like(v) for k, v in caches.items()}
    t = prompt_len
    args = {**w, "tokens": tokens[:, t:t + 1], "pos": np.full((batch, 1), t, np.int32)}
    with_cache = ex.call("decode", {**args, **caches})[0]
    without = ex.call("decode", {**args, **wiped})[0]
    assert normwise(with_cache, full_logits[:, t:t + 1]) <= CACHE_TOL
    assert normwise(without, full_logits[:, t:t + 1]) > 1e-6


@pytest.mark.parametrize("name", TINY)
def test_prefill_equals_prefix_plus_decode(name: str) -> None:
    model = load_spec(EXAMPLES / f"{name}.model").model
    check_cache_consistency(model, batch=2, prompt_len=5, steps=4, seed=3)


def test_generate_matches_incremental() -> None:
    """``runtime.generate.generate`` is the same prefill-then-decode loop."""
    _, cfg, module, w, tokens = tiny_setup("tiny-gqa")
    ex = ReferenceExecutor(module)
    logits, _ = incremental(ex, w, tokens, cfg.prompt_len)
    g = generate(ex, w, tokens, cfg.prompt_len)
    assert cfg.logits == "last"  # the serving default: the prompt's last position only
    assert g.prefill_logits.shape[1] == 1 and g.decode_logits.shape[1] == 3
    assert normwise(g.logits, logits) == 0.0


# ---- random small models --------------------------------------------------------------------


@st.composite
def model_specs(draw) -> ModelSpec:
    attention = draw(st.sampled_from(["multihead", "multiquery", "grouped"]))
    if attention == "grouped":
        kv = draw(st.sampled_from([2, 3]))
        heads = kv * draw(st.sampled_from([2, 3]))
    elif attention == "multiquery":
        heads, kv = draw(st.sampled_from([2, 4])), 1
    else:
        heads = kv = draw(st.sampled_from([1, 2, 4]))
    d_head = draw(st.sampled_from([2, 4, 6, 8]))
    rotary = draw(st.sampled_from([0] + list(range(2, d_head + 1, 2))))
    spec = ModelSpec(
        name="rand", layers=draw(st.integers(1, 2)), d_model=draw(st.sampled_from([4, 8, 12])),
        heads=heads, kv_heads=kv, d_head=d_head, d_ff=draw(st.sampled_from([4, 8, 16])),
        vocab=draw(st.sampled_from([7, 16])),
        block=draw(st.sampled_from(["serial", "parallel"])),
        mlp=draw(st.sampled_from(["gelu", "gelu-tanh", "swiglu"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([10000.0, 500.0])),
        rotary_dim=rotary,
        rotary_style=draw(st.sampled_from(["half", "interleaved"])),
        bias=draw(st.sampled_from(["none", "mlp", "all"])),
        tie_embeddings=draw(st.booleans()),
    )
    assert spec.attention == attention
    return spec


@settings(max_examples=25)
@given(model_specs(), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_random_models_cache_consistency(model: ModelSpec, batch: int, prompt_len: int, steps: int, seed: int) -> None:
    check_cache_consistency(model, batch, prompt_len, steps, seed)


@pytest.mark.slow
@settings(max_examples=10)
@given(model_specs(), st.integers(1, 2), st.integers(1, 4), st.integers(1, 2), st.integers(0, 2**16),
       st.sampled_from(["last", "all"]))
def test_random_models_reference_vs_jax(model: ModelSpec, batch: int, prompt_len: int, steps: int, seed: int,
                                        logits: str) -> None:
    # Each example compiles two entry points with XLA (about a second), hence few examples.
    cfg = BuildConfig(batch, prompt_len, prompt_len + steps, logits=logits)
    module = build_module(model, cfg)
    verify(module)
    w = random_weights(module.function("prefill"), seed)
    tokens = random_tokens(batch, prompt_len + steps, model.vocab, seed)
    assert compare(module, w, tokens, prompt_len) <= F32_TOL
