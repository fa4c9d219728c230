"""Checkpoint layer pieces that need no Hugging Face model: the model fields new families add
(sliding window, q/k/v-only bias) through the builder, the IR text and the kernels."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.build import BuildConfig, build_module, global_weights, layer_weights
from compiler.spec import format_spec, parse_spec
from ir.errors import SpecError, VerifyError
from ir.model import ModelSpec
from ir.parser import parse_module
from ir.printer import print_module
from ir.types import Dim, TensorType
from ir.verifier import verify
from runtime.generate import ReferenceExecutor
from runtime.kernels import RULES

BASE = dict(name="m", layers=1, d_model=8, heads=2, kv_heads=1, d_head=4, d_ff=8, vocab=11, mlp="swiglu",
            norm="rmsnorm")


def test_window_round_trips_through_spec_text_and_ir_text() -> None:
    m = ModelSpec(**BASE, sliding_window=3)
    from compiler.spec import Spec

    spec = parse_spec(format_spec(Spec(m)))
    assert spec.model == m and "sliding_window = 3" in format_spec(spec)
    assert "sliding_window" not in format_spec(Spec(ModelSpec(**BASE))), "an off window is left out"
    module = build_module(m, BuildConfig(batch=1, prompt_len=4, cache_len=6))
    text = print_module(module)
    assert text.count("causal_mask(") == 2 and text.count("{window = 3}") == 2
    assert print_module(parse_module(text)) == text
    plain = print_module(build_module(ModelSpec(**BASE), BuildConfig(batch=1, prompt_len=4, cache_len=6)))
    assert "window" not in plain, "no window attribute is printed when there is none"
    with pytest.raises(VerifyError, match="window must be >= 0"):
        verify(parse_module(text.replace("{window = 3}", "{window = -1}")))


def test_negative_window_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="sliding_window must be a non-negative integer"):
        ModelSpec(**BASE, sliding_window=-1)
    with pytest.raises(SpecError, match="sliding_window must be zero or positive"):
        parse_spec("model m {\n layers = 1\n d_model = 8\n heads = 2\n kv_heads = 1\n d_head = 4\n d_ff = 8\n"
                   " vocab = 11\n sliding_window = -2\n}\n")


def test_window_mask_by_hand() -> None:
    """Key t is visible from query position p iff p - window < t <= p."""
    m = build_module(ModelSpec(**BASE, sliding_window=2), BuildConfig(batch=1, prompt_len=4, cache_len=6))
    op = next(o for o in m.function("prefill_layer").ops if o.kind == "causal_mask")
    names = "BKGLT"
    s = np.zeros((1, 1, 2, 3, 6))
    pos = np.array([[0, 2, 5]])

    class Be:
        xp = np
    t = TensorType("f32", tuple(Dim(c, n) for c, n in zip(names, s.shape)))
    (out,) = RULES["causal_mask"](op, [s, pos], [t], Be(), None)
    visible = np.isfinite(out[0, 0, 0])
    want = np.array([[t_ <= p and t_ > p - 2 for t_ in range(6)] for p in (0, 2, 5)])
    np.testing.assert_array_equal(visible, want)


def test_qkv_bias_weights() -> None:
    m = ModelSpec(**BASE, bias="qkv")
    lw, gw = layer_weights(m), global_weights(m)
    assert {"bq", "bk", "bv"} <= set(lw) and not {"bo", "b_gate", "b_up", "b_down"} & set(lw)
    assert "lm_head_bias" not in gw
    module = build_module(m, BuildConfig(batch=1, prompt_len=2, cache_len=3, logits="all"))
    assert print_module(parse_module(print_module(module))) == print_module(module)
    ReferenceExecutor(module)  # builds and verifies


@pytest.mark.parametrize("ffn, attn", [("1d-ws", "heads"), ("2d-ws", "batch"), ("wg-xyz", "heads")])
def test_window_and_qkv_bias_sharded(ffn: str, attn: str) -> None:
    """Mistral's window and Qwen2's q/k/v biases under the layouts: the numpy SPMD simulator on 2x2x2
    equals the unpartitioned float64 reference over a prompt longer than the window and decode steps."""
    from partition_helpers import MESH_8, compile_layout, rel_err, run_pair, tiny_model

    from runtime.spmd import SpmdExecutor

    model = tiny_model("gqa", heads=8, sliding_window=2, bias="qkv", mlp="swiglu", norm="rmsnorm")
    sharded = compile_layout(model, 8, 4, 6, MESH_8, ffn, attn)
    assert "{window = 2}" in print_module(sharded), "the passes keep the window"
    got, ref = run_pair(sharded, model, 8, 4, 2, SpmdExecutor)
    assert rel_err(got, ref) < 1e-9
