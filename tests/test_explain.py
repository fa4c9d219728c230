"""``einshard explain``: golden text output for one configuration, the JSON fields scripts rely
on, --pareto, and ``compile --ffn auto --attn auto --pass-stats``.

Regenerate the golden file after an intended change with
``.venv/bin/einshard explain examples/palm-540b.model --hardware tpu-v4 --mesh x=4,y=4,z=4 --phase decode --batch 64 > tests/golden/explain/palm-540b_decode_b64.txt``
"""

from __future__ import annotations

import json

from compiler.cli import main
from conftest import EXAMPLES, GOLDEN

PALM = str(EXAMPLES / "palm-540b.model")
ARGS = [PALM, "--hardware", "tpu-v4", "--mesh", "x=4,y=4,z=4", "--phase", "decode", "--batch", "64"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_golden(capsys):
    code, out, err = run(capsys, "explain", *ARGS)
    assert code == 0, err
    assert out == (GOLDEN / "explain" / "palm-540b_decode_b64.txt").read_text()


def test_explain_json_fields(capsys):
    code, out, err = run(capsys, "explain", "examples/palm-62b.model".replace("examples/", str(EXAMPLES) + "/"),
                         "--hardware", "tpu-v4", "--mesh", "x=2,y=4,z=4", "--phase", "prefill", "--batch", "512",
                         "--json")
    assert code == 0, err
    d = json.loads(out)
    cands = d["candidates"]
    assert len(cands) == 10 and {c["phase"] for c in cands} == {"prefill"}
    legal = [c for c in cands if c["legal"]]
    for c in legal:
        for k in ("phase", "ffn", "attn", "weights", "step_time_s", "mfu", "cost_chip_ms_per_token",
                  "memory_per_chip_bytes", "fits", "chosen", "max_context"):
            assert k in c, k
        assert c["memory_per_chip_bytes"] == sum(v for k, v in c["memory"].items() if k != "activations_at")
    (chosen,) = [c for c in cands if c["chosen"]]
    assert (chosen["ffn"], chosen["attn"]) == ("wg-xyz", "batch") == tuple(d["chosen"]["prefill"].values())
    assert chosen["fits"] and chosen["step_time_s"] == min(c["step_time_s"] for c in legal if c["fits"])
    # the spec file names 2d-ws/batch: the top-level max_context is that layout's, not auto's
    (spec_layout,) = [c for c in cands if c["spec_layout"]]
    assert d["shown"]["prefill"] == {"ffn": "2d-ws", "attn": "batch"}
    assert isinstance(d["max_context"], int) and d["max_context"] == spec_layout["max_context"]


def test_explain_max_context_scales_with_kv_fraction(capsys):
    _, out, _ = run(capsys, "explain", *ARGS, "--json", "--kv-fraction", "0.2")
    quarter = json.loads(out)["max_context"]
    _, out, _ = run(capsys, "explain", *ARGS, "--json", "--kv-fraction", "0.4")
    half = json.loads(out)["max_context"]
    assert abs(half - 2 * quarter) <= 1 and half > 2048
    # past what the weights (16.2 of 32 GiB) leave, a larger share buys nothing more
    _, out, _ = run(capsys, "explain", *ARGS, "--json", "--kv-fraction", "0.9")
    most = json.loads(out)["max_context"]
    _, out, _ = run(capsys, "explain", *ARGS, "--json", "--kv-fraction", "1")
    assert json.loads(out)["max_context"] == most < 0.9 / 0.4 * half


def test_explain_pareto(tmp_path, capsys):
    png = tmp_path / "pareto.png"
    code, _, err = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--pareto", str(png), "--batches", "1,64,256",
                       "--phase", "decode")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "points written" in err


def test_explain_pareto_bad_file_is_a_clear_error(tmp_path, capsys):
    """An unknown image format or a missing folder is refused before the sweep, without a traceback."""
    for target, says in ((tmp_path / "pareto.txt", "unknown image format '.txt'"),
                         (tmp_path / "missing" / "pareto.png", "does not exist")):
        code, _, err = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--pareto", str(target))
        assert code == 1 and err.startswith("spec error: --pareto ") and says in err, err
        assert "Traceback" not in err and not target.exists()


def test_pareto_frontier():
    from compiler.cost.pareto import Point, frontier

    pts = [Point("decode", b, "bf16", "2d-ws", "batch", lat, cost, 0.1)
           for b, lat, cost in ((1, 1.0, 10.0), (4, 1.1, 3.0), (16, 2.0, 3.0), (64, 3.0, 1.0))]
    assert [p.batch for p in frontier(pts)] == [64, 4, 1]


def test_pareto_warns_about_implausible_mfu():
    from compiler.cost.pareto import Point, warnings

    pts = [Point("prefill", 512, "bf16", "wg-xyz", "batch", 1.0, 1.0, 0.97),
           Point("prefill", 64, "bf16", "wg-xy", "batch", 1.0, 1.0, 0.85)]
    (w,) = warnings(pts)
    assert "prefill bf16 batch 512 (wg-xyz/batch): predicted MFU 97% is above 90%" in w


def test_compile_auto_pass_stats(capsys):
    code, out, err = run(capsys, "compile", PALM, "--ffn", "auto", "--attn", "auto", "--pass-stats", "--emit", "none")
    assert code == 0, err
    assert "auto layout on tpu-v4" in err
    lines = err.splitlines()
    chosen = [ln for ln in lines if ln.rstrip().endswith("chosen")]
    assert len(chosen) == 1 and chosen[0].split()[:2] == ["2d-ws", "batch"]
    assert "shard{ffn=2d-ws,attn=batch}" in err  # the pipeline ran the chosen layout


def test_explain_errors(capsys):
    code, _, err = run(capsys, "explain", *ARGS, "--kv-fraction", "1.5")
    assert code == 1 and "--kv-fraction must be in (0, 1]" in err
    code, _, err = run(capsys, "explain", PALM, "--hardware", "tpu-v9")
    assert code == 1 and "invalid value 'tpu-v9' for hardware" in err


def test_explain_model_bound_is_below_calibrated(capsys):
    """--model bound keeps the lower bound; the default (calibrated) predicts, slower than it, with
    the chip's fitted efficiencies and their provenance in the JSON."""
    _, out, _ = run(capsys, "explain", *ARGS, "--json")
    cal = json.loads(out)
    _, out, _ = run(capsys, "explain", *ARGS, "--json", "--model", "bound")
    bound = json.loads(out)
    assert (cal["cost_model"], bound["cost_model"]) == ("calibrated", "bound")
    assert "paper-calibration.csv" in cal["hardware"]["efficiency"]["source"]
    assert bound["hardware"]["efficiency"]["flops"] == 1.0 > cal["hardware"]["efficiency"]["flops"]
    pairs = [(c, b) for c, b in zip(cal["candidates"], bound["candidates"]) if c["legal"]]
    assert pairs and all(b["step_time_s"] < c["step_time_s"] for c, b in pairs)


def test_explain_requested_layout_drives_footer_and_max_context(capsys):
    """With --ffn/--attn given, the footer and max_context describe the requested layout (head-
    sharded multiquery replicates the cache: a far shorter context than auto's batch-sharded one)."""
    _, out, _ = run(capsys, "explain", *ARGS, "--ffn", "2d-ws", "--attn", "heads", "--kv-fraction", "0.3", "--json")
    d = json.loads(out)
    (req,) = [c for c in d["candidates"] if (c["ffn"], c["attn"]) == ("2d-ws", "heads")]
    (auto,) = [c for c in d["candidates"] if c["chosen"]]
    assert d["shown"]["decode"] == {"ffn": "2d-ws", "attn": "heads"} != d["chosen"]["decode"]
    assert d["max_context"] == req["max_context"] < auto["max_context"] / 10
    _, out, _ = run(capsys, "explain", *ARGS, "--ffn", "2d-ws", "--attn", "heads", "--kv-fraction", "0.3")
    assert "requested 2d-ws/heads" in out and f"{req['max_context']} tokens" in out


def test_explain_no_fit_says_why(capsys):
    code, out, _ = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--mesh", "x=2,y=2,z=2", "--phase", "decode",
                       "--json")
    d = json.loads(out)
    assert code == 0 and d["chosen"]["decode"] is None
    assert "no layout fits in HBM (32 GiB per chip): the smallest" in d["no_fit"]["decode"]
    assert d["max_context"] == 0  # the weights alone overflow: no context fits


def test_explain_says_why_the_choice_is_not_monotonic_in_batch(capsys):
    """PaLM 540B prefill picks WG-XY at batches 64 and 80 but WG-X at 72: 72 does not divide over
    WG-XY's batch axes x,y (16 devices). explain says so, and notes partially replicated batches."""
    picks = {}
    for b in (64, 72, 80):
        code, out, _ = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--phase", "prefill", "--batch", str(b),
                           "--ffn", "auto", "--attn", "auto", "--overlap", "none", "--json")
        d = json.loads(out)
        picks[b] = d["chosen"]["prefill"]["ffn"]
        if b == 72:
            notes = {(c["ffn"], c["attn"]): c.get("note", "") for c in d["candidates"] if c["legal"]}
            assert "batch 72 does not divide over z,y,x (64 devices): sharded 4 ways over z" in notes["2d-ws", "batch"]
    assert picks == {64: "wg-xy", 72: "wg-x", 80: "wg-xy"}
    _, out, _ = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--phase", "prefill", "--batch", "72",
                    "--ffn", "auto", "--attn", "auto", "--overlap", "none", "--no-pad")
    assert "wg-xy/heads, wg-xy/batch, wg-xyz/heads, wg-xyz/batch: illegal at batch 72, which does not divide" in out
    assert "the choice is not monotonic in batch" in out
    # by default they are priced with the batch zero-padded (72 -> 80 over x,y), and still lose to WG-X
    _, out, _ = run(capsys, "explain", PALM, "--hardware", "tpu-v4", "--phase", "prefill", "--batch", "72",
                    "--ffn", "auto", "--attn", "auto", "--overlap", "none")
    assert "illegal" not in out
    assert "padded wg-xy/batch: B 72 -> 80" in out and "padded wg-xyz/heads: B 72 -> 128" in out


def _pareto_points():
    from compiler.cost.pareto import Point

    P = Point
    return [P("prefill", 1, "int8", "2d-ws", "heads", 0.28, 4.4, 0.4), P("prefill", 4, "int8", "wg-x", "batch", 0.9, 4.0, 0.45),
            P("prefill", 64, "int8", "wg-xy", "batch", 12.0, 3.4, 0.6), P("prefill", 256, "int8", "wg-xyz", "batch", 50, 3.3, 0.7),
            P("prefill", 256, "bf16", "wg-xyz", "batch", 50, 3.3, 0.7),
            P("decode", 1, "bf16", "2d-ws", "heads", 0.018, 1900, 0.01), P("decode", 256, "bf16", "2d-ws", "batch", 0.05, 12.5, 0.3),
            P("decode", 256, "int8", "2d-ws", "batch", 0.05, 12.5, 0.3), P("decode", 1024, "bf16", "2d-ws", "batch", 0.16, 9, 0.4)]


def test_pareto_points_on_one_spot_share_one_label():
    """bf16 and int8 at a batch where the format changes nothing land on one spot: one label
    naming both, not two printed on top of each other."""
    from compiler.cost.pareto import labels

    decode = [p for p in _pareto_points() if p.phase == "decode"]
    texts = [t for _, _, t in labels(decode)]
    assert len(texts) == 3
    assert "B=256\n2d-ws/batch\nbf16,int8" in texts


def test_pareto_axes_have_readable_tick_labels():
    """Every log axis carries at least two tick labels in plain numbers, also one spanning less
    than a decade (the prefill cost axis here: 3.3 to 4.4 chip-ms per token)."""
    from compiler.cost.pareto import figure

    fig = figure(_pareto_points(), "test")
    fig.canvas.draw()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            shown = [t.get_text() for t in axis.get_ticklabels() if t.get_text() and lo <= t.get_position()[
                axis is ax.yaxis] <= hi]
            assert len(shown) >= 2, (ax.get_title(), axis.axis_name, shown)
            assert all("$" not in t for t in shown), shown  # plain numbers, not 10^k math text


def _significant(token: str) -> int:
    """Significant digits as printed: a whole number of 4 or more digits counts as 4 (it keeps
    them all), zero as 4 when written 0.000."""
    digits = token.replace(".", "").lstrip("0")
    if "." not in token:
        return 4 if len(token) >= 4 else len(digits)
    return len(digits) if digits else len(token) - 1


def test_explain_numbers_keep_one_style_per_column(capsys):
    """Every time, cost and memory cell of the table has 4 significant digits (a whole number
    of 4 or more digits keeps them all), so a column never mixes 9355.338 with 10776 or 5.1
    with 4.677; MFU is a percentage with one decimal."""
    code, out, err = run(capsys, "explain", *ARGS, "--overlap", "looped")
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines() if ln.strip().endswith((" yes", " no"))]
    assert len(rows) == 10
    for cells in rows:
        numbers = [c for c in cells if c[0].isdigit() and c not in ("1d-ws", "2d-ws")]
        mfu = [c for c in numbers if c.endswith("%")]
        assert len(mfu) == 1 and len(mfu[0].split(".")[1]) == 2, cells  # "12.5%"
        values = [c for c in numbers if not c.endswith("%")]
        assert len(values) == 8, cells
        assert all(_significant(v) == 4 for v in values), cells
