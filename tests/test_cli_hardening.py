"""The CLI never shows a traceback: every bad path or value a user can give is a typed, located
error with exit 1, usage errors exit 64, and nothing nonsensical is accepted silently.

Each case was once a traceback or a silent exit 0 (issues 11 §2 and 16 §2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from compiler.cli import EXIT_ERROR, EXIT_USAGE, argv_location, main
from compiler.exit_codes import EXIT_INTERNAL
from compiler.limits import check_run_memory, run_memory_bytes
from compiler.subcommand import ensure_devices as _ensure_devices
from ir.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
MQA = str(ROOT / "examples" / "tiny-mqa.model")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_exit_codes_are_distinct() -> None:
    assert len({0, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL}) == 4 and EXIT_USAGE != 2 and EXIT_INTERNAL != 2


@pytest.mark.parametrize("argv", [["compile"], ["compile", MQA, "--bogus"], ["run", MQA, "--steps", "x"],
                                  ["nonsense"], []])
def test_usage_errors_exit_64(capsys, argv) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == EXIT_USAGE
    assert "usage: einshard" in capsys.readouterr().err


def test_non_utf8_ir_is_a_located_parse_error(capsys, tmp_path: Path) -> None:
    p = tmp_path / "b.ir"
    p.write_bytes(b"module @m {\n  \xff}\n")
    for cmd in ("compile", "explain", "run"):
        rc, _, err = cli(capsys, cmd, str(p))
        assert rc == EXIT_ERROR, err
        if cmd == "compile":
            assert err.startswith(f"{p}:2:3: parse error: IR file '{p}' is not UTF-8 text: byte 0xff")


@pytest.mark.parametrize("target,message", [
    ("nodir/x.ir", "folder '{d}/nodir' does not exist"),
    (".", "'{d}' is a directory"),
    ("f/x.ir", "'{d}/f' is not a folder"),
])
def test_unwritable_output(capsys, tmp_path: Path, target: str, message: str) -> None:
    (tmp_path / "f").write_text("")
    out = tmp_path / target if target != "." else tmp_path
    rc, stdout, err = cli(capsys, "compile", MQA, "--passes", "cleanup", "-o", str(out))
    assert rc == EXIT_ERROR and stdout == ""
    assert err.startswith("file error: -o ") and message.format(d=tmp_path) in err


@pytest.mark.parametrize("target", ["f", "f/sub"])
def test_dump_dir_blocked_by_a_file(capsys, tmp_path: Path, target: str) -> None:
    (tmp_path / "f").write_text("")
    rc, _, err = cli(capsys, "compile", MQA, "--passes", "cleanup", "--dump-dir", str(tmp_path / target))
    assert rc == EXIT_ERROR
    assert f"file error: --dump-dir '{tmp_path / target}': '{tmp_path / 'f'}' is a file, not a folder" in err


@pytest.mark.parametrize("body,message", [
    ('flops_bf16 = "fast"', "chip field 'flops_bf16' must be a finite number, got 'fast'"),
    ("flops_bf16 = [1, 2]", "chip field 'flops_bf16' must be a finite number, got [1, 2]"),
    ("flops_bf16 = {a = 1}", "chip field 'flops_bf16' must be a finite number"),
    ("flops_bf16 = 1e12\nhbm_bytes = inf", "chip field 'hbm_bytes' must be a finite number, got inf"),
    ("flops_bf16 = 1e12\nhbm_bytes = 1.5", "chip field 'hbm_bytes' must be a whole number"),
    ("flops_bf16 = true", "chip field 'flops_bf16' must be a finite number, got True"),
    ("flops_bf16 = -1.0", "chip field 'flops_bf16' must be > 0"),
])
def test_bad_chip_file(capsys, tmp_path: Path, body: str, message: str) -> None:
    p = tmp_path / "chip.toml"
    fields = {"name": '"c"', "flops_bf16": "1e12", "hbm_bytes": "1000000", "hbm_bw": "1e9", "ici_bw": "1e9"}
    given = {line.split("=")[0].strip() for line in body.splitlines()}
    p.write_text(body + "\n" + "\n".join(f"{k} = {v}" for k, v in fields.items() if k not in given) + "\n")
    rc, _, err = cli(capsys, "explain", MQA, "--hardware", str(p))
    assert rc == EXIT_ERROR and "cost error" in err and message in err, err


def test_non_utf8_chip_file(capsys, tmp_path: Path) -> None:
    p = tmp_path / "chip.toml"
    p.write_bytes(b'name = "c\xff"\n')
    rc, _, err = cli(capsys, "explain", MQA, "--hardware", str(p))
    assert rc == EXIT_ERROR and err.startswith(f"{p}:1:10: cost error: chip file '{p}' is not UTF-8 text")


@pytest.mark.parametrize("flag,value,message", [
    ("--seed", "-1", "--seed must be an integer in 0 .. 2^63-1, got -1"),
    ("--tolerance", "-1", "--tolerance must be a finite number > 0, got -1.0"),
    ("--tolerance", "nan", "--tolerance must be a finite number > 0, got nan"),
    ("--tolerance", "inf", "--tolerance must be a finite number > 0, got inf"),
    ("--devices", "-1", "--devices must be a device count in 1 .. 1024, got -1"),
    ("--devices", "0", "--devices must be a device count in 1 .. 1024, got 0"),
    ("--steps", "-2", "--steps must be a count >= 0, got -2"),
    ("--prompt-len", "0", "--prompt-len must be a token count >= 1, got 0"),
])
def test_values_out_of_range_point_into_the_command_line(capsys, flag: str, value: str, message: str) -> None:
    rc, _, err = cli(capsys, "run", MQA, flag, value)
    assert rc == EXIT_ERROR
    lines = err.splitlines()
    assert lines[0].startswith("<command line>:1:") and lines[0].endswith("spec error: " + message)
    assert lines[1] == f"  einshard run {MQA} {flag} {value}"
    assert lines[2] == "  " + " " * (len(f"einshard run {MQA} {flag} ")) + "^" + "~" * (len(value) - 1)


def test_argv_location_finds_the_last_value() -> None:
    loc = argv_location(["run", "m", "--seed=5", "--seed", "-1"], "--seed")
    assert loc is not None and (loc.col, loc.length) == (len("einshard run m --seed=5 --seed ") + 1, 2)
    loc = argv_location(["run", "m", "--seed=-77"], "--seed")
    assert loc is not None and (loc.col, loc.length) == (len("einshard run m --seed=") + 1, 3)
    assert argv_location(["run", "m"], "--seed") is None


def test_kv_fraction_out_of_range(capsys) -> None:
    rc, _, err = cli(capsys, "explain", MQA, "--kv-fraction", "nan")
    assert rc == EXIT_ERROR and "--kv-fraction must be in (0, 1], got nan" in err


@pytest.mark.parametrize("flag,value", [("--steps", "9999999999999999999999999"), ("--prompt-len", "10" * 12),
                                        ("--batch", "4611686018427387904"), ("--steps", "10000000000")])
def test_huge_shapes_are_refused_with_the_memory_they_need(capsys, flag: str, value: str) -> None:
    rc, _, err = cli(capsys, "run", MQA, flag, value)
    assert rc == EXIT_ERROR
    assert "spec error: these shapes need at least" in err and "of host memory" in err and "this machine has" in err


def test_memory_estimate_counts_the_kv_cache() -> None:
    from compiler.build import BuildConfig
    from compiler.spec import load_spec

    spec = load_spec(MQA)
    small = run_memory_bytes(spec, BuildConfig(8, 16, 20))
    big = run_memory_bytes(spec, BuildConfig(8, 16, 40))
    m = spec.model
    assert big["KV cache"] - small["KV cache"] == m.layers * 2 * 8 * 20 * m.kv_heads * m.d_head * 12
    check_run_memory(spec, BuildConfig(8, 16, 20), available=1 << 30)  # fits
    with pytest.raises(SpecError, match="need at least"):
        check_run_memory(spec, BuildConfig(8, 16, 20), available=1000)


def test_overrides_with_ir_input_are_refused(capsys, tmp_path: Path) -> None:
    p = tmp_path / "g.ir"
    p.write_text("module @m {\n}\n")
    rc, _, err = cli(capsys, "compile", str(p), "--mesh", "bogus", "--batch", "-5")
    assert rc == EXIT_ERROR
    assert "spec error: --mesh, --batch change a model spec, but" in err
    rc, _, err = cli(capsys, "compile", str(p), "--set", "model.layers=2")
    assert rc == EXIT_ERROR and "--set change a model spec" in err
    rc, out, _ = cli(capsys, "compile", str(p))
    assert rc == 0 and out.startswith("module @m")


@pytest.mark.parametrize("flag", ["--print-ir-after", "--print-ir-before"])
def test_dump_of_a_pass_not_in_the_pipeline(capsys, flag: str) -> None:
    rc, out, err = cli(capsys, "compile", MQA, "--passes", "cleanup", f"{flag}=nonexistent-pass")
    assert rc == EXIT_ERROR and out == ""
    assert f"pass error: {flag}=nonexistent-pass: no pass is named 'nonexistent-pass'" in err
    rc, _, err = cli(capsys, "compile", MQA, "--passes", "cleanup", f"{flag}=shard")
    assert rc == EXIT_ERROR and f"{flag}=shard: the pipeline does not run 'shard'" in err
    rc, _, err = cli(capsys, "compile", MQA, "--passes", "cleanup", f"{flag}=cleanp")
    assert "did you mean 'cleanup'?" in err


def test_pass_order_prerequisites(capsys) -> None:
    rc, out, err = cli(capsys, "compile", MQA, "--passes", "quantize-int8,pad-heads{multiple=3}")
    assert rc == EXIT_ERROR and out == ""
    assert err.startswith("pass error: pass 'pad-heads' must run before 'quantize-int8'")
    for bad in ("insert-collectives,shard", "collective-einsum,insert-collectives", "shard,fuse-parallel-block",
                "collective-einsum,quantize-int8", "fuse-parallel-block,pad-heads"):
        rc, _, err = cli(capsys, "compile", MQA, "--passes", bad)
        first, second = bad.split(",")
        assert rc == EXIT_ERROR and f"pass '{second}' must run before '{first}'" in err, (bad, err)


def test_prompt_len_zero_names_the_flag_not_the_cache() -> None:
    from compiler.driver import run_config
    from compiler.spec import load_spec

    with pytest.raises(SpecError, match=r"--prompt-len must be a token count >= 1, got 0"):
        run_config(load_spec(MQA), 4, 0)


def test_devices_flag_replaces_a_count_in_xla_flags(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)  # pretend JAX has started
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    _ensure_devices(8, explicit=True)  # the same count: fine
    with pytest.raises(SpecError, match=r"--devices 4 cannot take effect: JAX has already started \(with 8 devices from XLA_FLAGS\)"):
        _ensure_devices(4, explicit=True)
    monkeypatch.delitem(sys.modules, "jax")  # before JAX starts: the explicit count wins
    monkeypatch.setenv("XLA_FLAGS", "--foo --xla_force_host_platform_device_count=4 --bar")
    _ensure_devices(8, explicit=True)
    assert os.environ["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=8 --bar"
    _ensure_devices(2)  # not explicit: an existing count stays
    assert os.environ["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=8 --bar"
    monkeypatch.setenv("XLA_FLAGS", "")
    _ensure_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_missing_checkpoint_dir(capsys, tmp_path: Path) -> None:
    rc, _, err = cli(capsys, "run", MQA, "--checkpoint", str(tmp_path / "nope"))
    assert rc == EXIT_ERROR and "file error: --checkpoint" in err
