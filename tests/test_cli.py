"""The ``einshard`` command line, in process: ``compiler.cli.main([...])`` with captured output.

Documented errors print ``file:line:col: kind: message``, the source line and a caret, and exit 1
without a traceback; successful commands exit 0. ``run`` executes with JAX on the simulated CPU
devices that tests/conftest.py asks for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compiler.cli import EXIT_USAGE, main
from compiler.driver import default_pipeline
from compiler.spec import load_spec
from ir.parser import parse_module
from ir.printer import print_module
from ir.verifier import verify
from passes.pipeline import parse_pipeline

ROOT = Path(__file__).resolve().parent.parent
MQA = str(ROOT / "examples" / "tiny-mqa.model")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def default_pass_names() -> list[str]:
    return list(parse_pipeline(default_pipeline(load_spec(MQA))).names())


# ---- compile -------------------------------------------------------------------------------


def test_compile_prints_ir(capsys) -> None:
    rc, out, err = cli(capsys, "compile", MQA)
    assert rc == 0, err
    assert out.startswith("module @tiny-mqa mesh<x=2, y=2, z=2> {\n")
    m = parse_module(out)
    verify(m)
    assert [f.name for f in m.entries] == ["prefill"]  # the spec's serve.phase
    assert print_module(m) == out


def test_compile_without_passes_is_the_builder_output(capsys) -> None:
    rc, out, _ = cli(capsys, "compile", MQA, "--phase", "decode", "--passes", "")
    assert rc == 0
    assert out == (ROOT / "tests" / "golden" / "build_tiny-mqa_decode.ir").read_text()


def test_compile_overrides(capsys) -> None:
    rc, out, _ = cli(capsys, "compile", MQA, "--passes", "cleanup", "--mesh", "1", "--batch", "2",
                     "--set", "model.layers=3", "--phase", "decode")
    assert rc == 0
    assert out.startswith("module @tiny-mqa {\n")
    assert "input %tokens: i32[B=2, L=1]" in out
    assert "weight %wq: f32[N=3, E=64, H=4, D=16]" in out


def test_compile_output_file_and_emit_none(capsys, tmp_path: Path) -> None:
    rc, out, _ = cli(capsys, "compile", MQA, "--passes", "cleanup", "-o", str(tmp_path / "o.ir"))
    assert rc == 0 and out == ""
    verify(parse_module((tmp_path / "o.ir").read_text()))
    rc, out, _ = cli(capsys, "compile", MQA, "--emit", "none")
    assert rc == 0 and out == ""


def test_dump_dir(capsys, tmp_path: Path) -> None:
    d = tmp_path / "dumps"
    rc, out, _ = cli(capsys, "compile", MQA, "--dump-dir", str(d))
    assert rc == 0
    names = default_pass_names()
    want = ["00-input.ir"] + [f"{i:02d}-{n}.ir" for i, n in enumerate(names, start=1)]
    assert sorted(p.name for p in d.iterdir()) == want
    assert (d / want[-1]).read_text() == out
    for f in want:
        verify(parse_module((d / f).read_text(), f))


def test_pass_stats(capsys) -> None:
    rc, out, err = cli(capsys, "compile", MQA, "--passes", "cleanup,cleanup{max_rounds=3}", "--pass-stats")
    assert rc == 0 and out.startswith("module @")
    lines = err.splitlines()
    assert "... Pass statistics report ..." in lines[1]
    assert lines[3] == "cleanup"
    assert "cleanup{max_rounds=3}" in lines
    assert re.fullmatch(r" +\d+  fold-identity matches", lines[4])
    assert any(re.fullmatch(r" +1  rounds", ln) for ln in lines)


def test_pass_stats_of_the_default_pipeline(capsys) -> None:
    rc, _, err = cli(capsys, "compile", MQA, "--pass-stats")
    assert rc == 0
    for name in default_pass_names():
        assert any(ln == name or ln.startswith(name + "{") for ln in err.splitlines()), name


def test_time_passes(capsys) -> None:
    rc, _, err = cli(capsys, "compile", MQA, "--passes", "cleanup", "--time-passes")
    assert rc == 0
    assert "... Execution time report ..." in err
    assert re.search(r"^  Total Execution Time: \d+\.\d{4} seconds$", err, re.M)
    assert re.search(r"^ +\d+\.\d{4} \( *\d+\.\d%\)  cleanup$", err, re.M)
    assert re.search(r"^ +\d+\.\d{4} \(100\.0%\)  Total$", err, re.M)


def test_print_ir_after_all_goes_to_stderr(capsys) -> None:
    rc, out, err = cli(capsys, "compile", MQA, "--passes", "cleanup", "--print-ir-after-all")
    assert rc == 0
    assert err.startswith("// -----// IR Dump After Cleanup (cleanup) //----- //\nmodule @tiny-mqa")
    assert err.split("\n", 1)[1] == out


def test_compile_ir_file(capsys, tmp_path: Path) -> None:
    rc, out, _ = cli(capsys, "compile", MQA, "--passes", "cleanup")
    p = tmp_path / "tiny.ir"
    p.write_text(out)
    rc, again, err = cli(capsys, "compile", str(p), "--passes", "cleanup")
    assert rc == 0, err
    assert again == out


def test_compile_invalid_ir_file(capsys, tmp_path: Path) -> None:
    p = tmp_path / "bad.ir"
    p.write_text("module @m {\n  entry func @f(%x: f32[B=4]) -> (f32[B=4]) {\n"
                 "    %y = unary(%x) {fn = \"neg\"} : f32[B=8]\n    return %y\n  }\n}\n")
    rc, out, err = cli(capsys, "compile", str(p), "--passes", "cleanup")
    assert rc == 1 and out == ""
    assert err.splitlines() == [
        f"{p}:3:5: verify error: the input is invalid: %y is annotated f32[B=8] but unary gives f32[B=4]",
        "      %y = unary(%x) {fn = \"neg\"} : f32[B=8]",
        "      ^",
    ]


def test_compile_unparsable_ir_file(capsys, tmp_path: Path) -> None:
    p = tmp_path / "bad.ir"
    p.write_text("module @m {\n  func @f( -> () {\n  }\n}\n")
    rc, _, err = cli(capsys, "compile", str(p))
    assert rc == 1
    assert err.startswith(f"{p}:2:12: parse error: unexpected '->'")
    assert err.splitlines()[1:3] == ["    func @f( -> () {", "             ^~"]
    assert "Traceback" not in err


# ---- errors --------------------------------------------------------------------------------


def test_spec_error_has_location_and_caret(capsys, tmp_path: Path) -> None:
    p = tmp_path / "bad.model"
    p.write_text("model t {\n  layers = two\n  d_model = 64\n}\n")
    rc, out, err = cli(capsys, "compile", str(p))
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert re.match(rf"{re.escape(str(p))}:2:12: spec error: ", lines[0])
    assert lines[1] == "    layers = two"
    assert lines[2] == "             ^~~"
    assert "Traceback" not in err


def test_override_error_points_into_the_command_line(capsys) -> None:
    rc, _, err = cli(capsys, "compile", MQA, "--set", "model.layer=3")
    assert rc == 1
    lines = err.splitlines()
    assert lines[0].startswith("<command line>:1:7: spec error: unknown field 'layer'")
    assert lines[1:3] == ["  model.layer=3", "        ^~~~~"]
    assert "did you mean 'layers'" in err
    assert "Traceback" not in err


def test_missing_spec_file(capsys, tmp_path: Path) -> None:
    rc, _, err = cli(capsys, "compile", str(tmp_path / "nope.model"))
    assert rc == 1
    assert err.startswith("spec error: cannot read spec file")
    assert "Traceback" not in err


def test_bad_passes(capsys) -> None:
    rc, out, err = cli(capsys, "compile", MQA, "--passes", "cleanup,cleanp")
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == "<pipeline>:1:9: pass error: unknown pass 'cleanp'"
    assert lines[1:3] == ["  cleanup,cleanp", "          ^~~~~~"]
    assert lines[3].startswith("  hint: did you mean 'cleanup'?")
    assert "Traceback" not in err


def test_bad_pass_option_value(capsys) -> None:
    rc, _, err = cli(capsys, "compile", MQA, "--passes", "cleanup{max_rounds=lots}")
    assert rc == 1
    assert err.startswith("<pipeline>:1:9: pass error: bad value for cleanup.max_rounds: 'lots'")


def test_run_rejects_ir_input(capsys, tmp_path: Path) -> None:
    p = tmp_path / "m.ir"
    p.write_text("module @m {\n}\n")
    rc, _, err = cli(capsys, "run", str(p))
    assert rc == 1
    assert err.startswith("spec error: einshard run needs a model spec, not IR")


def test_usage_error_exits_64(capsys) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["compile"])
    assert ei.value.code == EXIT_USAGE == 64
    assert "usage: einshard compile" in capsys.readouterr().err


# ---- run -----------------------------------------------------------------------------------


def test_run_check_json(capsys) -> None:
    rc, out, err = cli(capsys, "run", MQA, "--check", "--json", "--steps", "2")
    assert rc == 0, err
    r = json.loads(out)
    assert r["ok"] is True and r["checked"] is True
    assert isinstance(r["max_abs_err"], float) and isinstance(r["max_rel_err"], float)
    assert r["tolerance"] == 1e-4  # the f32 default (compiler/run.py TOLERANCES)
    assert 0 <= r["max_rel_err"] <= r["tolerance"]
    c = r["config"]
    assert c["spec"] == MQA
    assert c["model"]["name"] == "tiny-mqa" and c["model"]["kv_heads"] == 1
    assert c["mesh"] == {"x": 2, "y": 2, "z": 2}
    assert c["serve"]["phase"] == "prefill"
    assert (c["batch"], c["prompt_len"], c["decode_steps"], c["cache_len"]) == (8, 16, 2, 18)
    assert c["weights"] == "random(seed=0)"
    assert c["pipeline"] == str(parse_pipeline(default_pipeline(load_spec(MQA))))
    assert len(r["last_step_argmax"]) == 8


def test_run_with_absurd_tolerance_fails(capsys) -> None:
    rc, out, err = cli(capsys, "run", MQA, "--check", "--json", "--steps", "1", "--tolerance", "1e-30",
                       "--passes", "cleanup", "--set", "model.layers=1")
    assert rc == 1
    r = json.loads(out)
    assert r["ok"] is False
    assert r["tolerance"] == 1e-30
    assert r["max_rel_err"] > 1e-30


def test_run_text_report(capsys) -> None:
    rc, out, _ = cli(capsys, "run", MQA, "--check", "--steps", "1", "--passes", "cleanup", "--set", "model.layers=1")
    assert rc == 0
    assert re.search(r"^check +OK: max abs err \S+, max rel err \S+ \(tolerance 1\.0e-04, vs numpy float64 reference\)$",
                     out, re.M)
    assert re.search(r"^model +tiny-mqa: 1 layers", out, re.M)


# ---- passes --------------------------------------------------------------------------------


def test_passes_lists_cleanup(capsys) -> None:
    rc, out, _ = cli(capsys, "passes")
    assert rc == 0
    lines = out.splitlines()
    assert "cleanup: fold identities and collective algebra, CSE, dead code and dead functions" in lines
    i = lines.index("cleanup: fold identities and collective algebra, CSE, dead code and dead functions")
    assert lines[i + 1].split() == ["max_rounds=16", "(int)"]
