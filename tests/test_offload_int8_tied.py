"""Streamed int8 with a tied embedding computes what resident int8 computes.

The other offload tests use untied tiny checkpoints, whose int8 head is a streamed-store global
like any projection. A tied table is quantized with row scales (passes/quantize_int8.py) and the
resident program gathers its int8 rows and runs the head as int8_dot (runtime/lower_jax.py); the
streamed pieces must run the same rules, and the dequantized table, made before the layer scan,
must still be recognised by the head after it (SmolLM2's streamed int8 tokens differed from
resident at batch 1 when the pieces took the float table across the boundary).
"""

from __future__ import annotations

import re

import pytest

from compiler.generation import make_runner
from compiler.offload import ensure_store, make_offload_runner, store_key
from gen_helpers import CONTEXT, NEW, PROMPTS, VOCAB, hf_model, load_spec_and_weights
from runtime import cpu_kernels
from runtime.generator import GenerateRequest, Generator
from runtime.offload import OffloadGenerator
from runtime.offload_store import read_layout
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    d = tmp_path_factory.mktemp("off-tied")
    hf_model("llama", tie_word_embeddings=True).save_pretrained(d)
    spec, weights = load_spec_and_weights(d, weights="int8")
    key = store_key(d, spec)
    store = d / "store"
    ensure_store(spec, key, store, lambda: weights)
    return d, spec, weights, key, store


def _runner(tied, **kw):
    _, spec, _, key, store = tied
    layout = read_layout(store, key)
    assert "embed_scale" in {sl.name for sl in layout.globals_}, "the tied table is not int8 with row scales"
    return make_offload_runner(spec, store, key, CONTEXT, layout.globals_bytes + 2 * layout.layer_bytes, **kw)


def test_streamed_int8_tied_tokens_equal_resident(tied) -> None:
    _, spec, weights, _, _ = tied
    resident = Generator(make_runner(spec, weights, CONTEXT))
    req = GenerateRequest.of(PROMPTS, SamplingParams(), NEW)
    r = _runner(tied, poison=True)
    try:
        for batch in (1, 4):
            got = OffloadGenerator(r).generate(GenerateRequest.of(PROMPTS[:batch], SamplingParams(), NEW), batch=batch)
            assert got.tokens == resident.generate(GenerateRequest.of(PROMPTS[:batch], SamplingParams(), NEW),
                                                   batch=batch).tokens
        assert OffloadGenerator(r).generate(req).tokens == resident.generate(req).tokens
        # the streamed request ran the Generator's program shape: a KV cache of the positions it
        # writes, bucketed, not the runner's whole context (int8 x int8 activations round
        # differently over 16 or 64 masked positions: SmolLM2's tokens differed)
        ctx = r.context_for(max(len(p) for p in PROMPTS) + NEW)
        assert ctx < CONTEXT
        assert {k[3] for k in r._pieces} == {ctx}
    finally:
        r.close()


def test_streamed_tied_head_runs_int8_dot(tied) -> None:
    """The piece after the scan contracts the int8 table with int8 activations into int32 (the
    resident head's int8_dot), not a float copy of the table passed from the piece before it."""
    r = _runner(tied)
    try:
        for phase, length in (("prefill", 8), ("decode", 1)):
            hlo = r.step_fns(phase, 1, length, True).after.as_text()
            # XLA's int8 dot, or the same product in einshard's CPU kernel (runtime/cpu_kernels)
            kernel = rf'custom-call\(.*custom_call_target="{cpu_kernels.TARGET}"'
            assert re.search(rf"s32\[\d+,{VOCAB}\]\S* (dot\(|{kernel})", hlo), phase
    finally:
        r.close()


def test_store_of_another_program_is_rebuilt(tied, tmp_path, monkeypatch) -> None:
    """A store written by a program that took other weights (before quantize-int8 made the tied
    table int8 with row scales: no ``embed_scale``) has another key, so it is rebuilt in its
    directory rather than reused and refused mid-run."""
    import passes.quantize_int8 as q

    d, spec, weights, _, _ = tied
    choose = q._choose
    with monkeypatch.context() as m:  # the earlier pass: a gathered table stays float
        m.setattr(q, "_choose", lambda prep, ws, red, why, one_device: choose(prep, ws, red, why, False))
        old = store_key(d, spec)
        assert ensure_store(spec, old, tmp_path, lambda: weights)
        assert "embed_scale" not in {sl.name for sl in read_layout(tmp_path, old).globals_}
    new = store_key(d, spec)
    assert new != old and new == tied[3]
    assert ensure_store(spec, new, tmp_path, lambda: weights)  # rebuilt, not reused
    assert not ensure_store(spec, new, tmp_path, lambda: weights)  # and then reused
    assert "embed_scale" in {sl.name for sl in read_layout(tmp_path, new).globals_}
