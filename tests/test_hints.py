"""Hints never suggest a setting already in force (compiler/hints.py): the driver records the
settings a spec resolved to, and the CLI prunes every error's hint against them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from compiler import driver, hints
from compiler.cli import EXIT_ERROR, main
from compiler.spec import load_spec
from ir.errors import LayoutError

BATCH_HINT = "choose a batch divisible by the devices it is split over (--batch), or --attn heads"
KV_HINT = "pad the grouped-query heads with zero heads (--set serve.kv=pad; the default kv=auto pads when no sharding divides)"


@pytest.mark.parametrize("hint, settings, want", [
    (BATCH_HINT, {"attn": "heads"}, "choose a batch divisible by the devices it is split over (--batch)"),
    (BATCH_HINT, {"attn": "batch"}, BATCH_HINT),
    (KV_HINT, {"kv": "pad"}, None),  # its only suggestion is in force: no hint rather than a stale one
    (KV_HINT, {"kv": "auto"}, KV_HINT),  # "kv=auto" without -- or serve. is prose, not a suggestion
    ("use --ffn 2d-ws; or --attn batch", {"ffn": "2d-ws", "attn": "heads"}, "--attn batch"),
    ("use --ffn 2d-ws or --mesh x=4", {"ffn": "2d-ws"}, "--mesh x=4"),
    ("raise serve.seq or lower --steps", {"ffn": "2d-ws"}, "raise serve.seq or lower --steps"),
    (None, {"attn": "heads"}, None),
])
def test_prune(hint, settings, want) -> None:
    assert hints.prune(hint, settings) == want


def test_alternatives_inside_parentheses_stay_whole() -> None:
    assert hints._alternatives("a (b or c), or d; e") == ["a (b or c)", "d", "e"]


def test_resolved_records_the_settings_in_force() -> None:
    spec = load_spec("examples/tiny-gqa.model")
    out = driver.resolved(spec)
    assert hints.in_force()["ffn"] == out.serve.ffn
    assert hints.in_force()["kv"] == out.serve.kv and out.serve.kv != "auto"


def test_cli_prunes_a_stale_hint(capsys, monkeypatch) -> None:
    """An error raised after the spec resolved to attn=heads does not suggest --attn heads."""
    def fail(args) -> int:
        driver.resolved(load_spec("examples/tiny-gqa.model"))  # records attn = heads
        raise LayoutError("KV cache: dim B=3 does not divide", hint=BATCH_HINT)

    import compiler.cli as cli
    monkeypatch.setattr(cli, "SUBCOMMANDS", [s if s.name != "passes" else replace(s, run=fail)
                                             for s in cli.SUBCOMMANDS])
    assert main(["passes"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "does not divide" in err
    assert "--attn heads" not in err and "(--batch)" in err
