"""``einshard explain --phase generate``: one whole request batch (compiler/cost/generation.py):
the prefill, G decode steps with a growing context, the reshard between the phases' layouts,
their sum, the paper's MFU per phase and overall, and --pareto's generation mode."""

from __future__ import annotations

import json

import pytest

from compiler.cli import main
from compiler.cost.autolayout import evaluate
from compiler.cost.generation import estimate_generation, reshard_seconds
from compiler.cost.hardware import CHIPS
from compiler.spec import apply_overrides, load_spec
from conftest import EXAMPLES

V4 = CHIPS["tpu-v4"]


def palm(batch: int, weights: str = "int8"):
    return apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), batch=batch, weights=weights, ffn="auto",
                           attn="auto")


def test_generation_sums_its_phases_by_hand():
    """20 input and 8 output tokens at batch 64 on 64 chips (an appendix benchmark's shape): the
    prefill is one pass at P = 20 in auto's prefill layout; decode is G x the mean of the steps
    at contexts P + 1 and P + G in auto's decode layout (chosen at P + G); the total adds the
    reshard; MFU is 2 N tokens / (chips x peak) over each time."""
    P, G, B = 20, 8, 64
    g = estimate_generation(palm(B), V4, P, G)
    pre = evaluate(apply_overrides(palm(B), phase="prefill", seq=P), V4).chosen
    end = evaluate(apply_overrides(palm(B), phase="decode", seq=P + G), V4).chosen
    start = evaluate(apply_overrides(palm(B), phase="decode", seq=P + 1, ffn=end.ffn, attn=end.attn), V4).chosen
    assert (g.prefill.ffn, g.prefill.attn) == (pre.ffn, pre.attn)
    assert (g.decode.ffn, g.decode.attn) == (end.ffn, end.attn)
    assert g.prefill_s == pre.estimate.step_time_s
    assert g.decode_s == pytest.approx(G * (start.estimate.step_time_s + end.estimate.step_time_s) / 2, rel=1e-12)
    assert start.estimate.step_time_s < end.estimate.step_time_s  # a longer context reads more KV cache
    assert g.total_s == pytest.approx(g.prefill_s + g.reshard_s + g.decode_s, rel=1e-12)
    ideal = 2 * pre.estimate.n_params / (64 * 275e12)
    assert g.mfu_prefill == pytest.approx(ideal * B * P / g.prefill_s, rel=1e-12)
    assert g.mfu_decode == pytest.approx(ideal * B * G / g.decode_s, rel=1e-12)
    assert g.mfu_total == pytest.approx(ideal * B * (P + G) / g.total_s, rel=1e-12)
    assert min(g.mfu_prefill, g.mfu_decode) <= g.mfu_total <= max(g.mfu_prefill, g.mfu_decode)


def test_reshard_moves_weights_only_between_1d_and_the_shared_2d_storage():
    """2D-WS and the weight-gathered layouts store weights alike (E_x F_yz): no weight moves;
    1D-WS stores them otherwise: all of a chip's weights move. The prompt's KV cache moves when
    the attention sharding changes."""
    s = apply_overrides(palm(64), phase="decode", seq=2048)
    cands = {(c.ffn, c.attn): c for c in evaluate(s, V4, ("1d-ws", "2d-ws", "wg-x"), ("batch", "heads")).candidates}
    two, one, wg = cands["2d-ws", "heads"], cands["1d-ws", "heads"], cands["wg-x", "heads"]
    assert reshard_seconds(V4, "bound", two, wg) == 0.0
    assert reshard_seconds(V4, "bound", two, one) == pytest.approx(two.estimate.memory.weights / 270e9)
    kv_move = reshard_seconds(V4, "bound", two, cands["2d-ws", "batch"])
    assert kv_move == pytest.approx(two.estimate.memory.kv / 270e9) and kv_move > 0


def test_no_new_tokens_is_the_prefill_alone():
    g = estimate_generation(palm(8), V4, 128, 0)
    assert g.decode is None and g.decode_s == g.reshard_s == 0 and g.total_s == g.prefill_s


@pytest.mark.parametrize("argv,message", [(["--prompt-len", "0"], "--prompt-len must be"),
                                          (["--new-tokens", "-1"], "--new-tokens must be >= 0")])
def test_generation_flags_are_checked(capsys, argv, message):
    code = main(["explain", str(EXAMPLES / "tiny-mqa.model"), "--phase", "generate", *argv])
    assert code != 0 and message in capsys.readouterr().err


def test_explain_generate_cli(capsys, tmp_path):
    args = ["explain", str(EXAMPLES / "palm-540b.model"), "--hardware", "tpu-v4", "--phase", "generate",
            "--prompt-len", "20", "--new-tokens", "8", "--batch", "64"]
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("prefill_s", "decode_s", "reshard_s", "total_s", "mfu_prefill", "mfu_decode", "mfu_total"):
        assert isinstance(d[k], float), k
    assert set(d["layout"]) == {"prefill", "decode"} and d["layout"]["decode"]["attn"] == "batch"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out and "reshard" in out and "total" in out


def test_explain_generate_pareto(capsys, tmp_path):
    png = tmp_path / "gen.png"
    code = main(["explain", str(EXAMPLES / "tiny-mqa.model"), "--hardware", "tpu-v4", "--phase", "generate",
                 "--prompt-len", "16", "--new-tokens", "4", "--pareto", str(png), "--batches", "8,64"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert png.stat().st_size > 1000 and "pareto: 4 points written" in err
