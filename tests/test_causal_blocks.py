"""Prefill attention in causal query blocks (runtime/causal_blocks.py): same logits and tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime.causal_blocks as cb
from compiler.generation import make_runner
from gen_helpers import hf_greedy, hf_model, load_spec_and_weights
from runtime.model_runner import pack_prompts

L = 256


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    m = hf_model(request.param)
    m.save_pretrained(d)
    spec, weights = load_spec_and_weights(d)
    return m, spec, weights


def _prefill(spec, weights, tokens, pos, blocks, monkeypatch):
    """Last-column logits of a batch-1... prefill of L columns, and the compiled HLO."""
    monkeypatch.setattr(cb, "BLOCKS", blocks)
    runner = make_runner(spec, weights, L)
    step = runner.step("prefill", tokens.shape[0], L)
    f = jax.jit(lambda p, t, q, c: step(p, t, q, c)[0])
    args = (runner.params, jnp.asarray(tokens), jnp.asarray(pos), runner.empty_cache(tokens.shape[0], L))
    return np.asarray(f(*args)), f.lower(*args).compile().as_text()


def test_blocked_prefill_equals_the_whole_one_and_transformers(tiny_model, monkeypatch):
    """A prompt filling the bucket from position 0 takes the blocked branch: logits within f32
    rounding of the unblocked program, and greedy tokens equal transformers'."""
    m, spec, weights = tiny_model
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, spec.model.vocab, L).tolist()
    tokens, pos = pack_prompts([prompt], L)
    got, hlo = _prefill(spec, weights, tokens, pos, 8, monkeypatch)
    want, hlo1 = _prefill(spec, weights, tokens, pos, 1, monkeypatch)
    assert "conditional(" in hlo and "conditional(" not in hlo1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert int(got[0].argmax()) == hf_greedy(m, prompt, 1)[0]


def test_padded_rows_take_the_whole_branch(tiny_model, monkeypatch):
    """Rows padded in front (later positions in the first columns) fail the block bound: the
    program runs the whole attention and each row's logits equal its unblocked ones."""
    m, spec, weights = tiny_model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, spec.model.vocab, n).tolist() for n in (L, 200)]
    tokens, pos = pack_prompts(prompts, L)
    got, _ = _prefill(spec, weights, tokens, pos, 8, monkeypatch)
    want, _ = _prefill(spec, weights, tokens, pos, 1, monkeypatch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [int(r.argmax()) for r in got] == [hf_greedy(m, p, 1)[0] for p in prompts]
