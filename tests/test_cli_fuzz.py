"""CLI fuzzer: random subcommands, flags and values (valid and not), files that are missing, folders,
not UTF-8, or blocked by a file. Every command line ends in exit 0, 1 or 64, never a traceback.

CI runs a few hundred command lines (hypothesis profile ``ci``); ``make fuzz`` (profile ``fuzz``)
runs 10,000. ``run`` executes its compiled program with the numpy SPMD simulator in place of
JAX (the same interface), so thousands of runs stay fast; JAX itself is tested elsewhere.
Unreadable files cannot be fuzzed here: the tests may run as root, who reads everything.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.cli import main
from compiler.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parent.parent
TINY = """model tiny {
  layers = 1  d_model = 16  heads = 4  kv_heads = 2  d_head = 4  d_ff = 32  vocab = 32
  block = parallel  mlp = swiglu  norm = rmsnorm
}
mesh { x = 2  y = 2 }
serve { phase = prefill  batch = 4  seq = 4  ffn = 2d-ws  attn = heads }
"""
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
                "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 1, "vocab_size": 32, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "good.model").write_text(TINY)
    (d / "bad.model").write_text("model {\n  layers = two\n")
    (d / "latin1.model").write_bytes(TINY.replace("tiny", "t\xe9").encode("latin-1"))
    (d / "good.ir").write_text("module @m {\n}\n")
    (d / "latin1.ir").write_bytes(b"module @m {\xff}\n")
    (d / "garbage.ir").write_text("module @m { func")
    (d / "blocker").write_text("")
    (d / "folder").mkdir()
    (d / "folder.model").mkdir()
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (d / "hf-bad").mkdir()
    (d / "hf-bad" / "config.json").write_bytes(b"{\xff")
    (d / "chip.toml").write_text('name = "c"\nflops_bf16 = 1e12\nhbm_bytes = 1000000000\nhbm_bw = 1e9\nici_bw = 1e9\n')
    (d / "badchip.toml").write_text('name = "c"\nflops_bf16 = "fast"\nhbm_bytes = inf\n')
    (d / "latin1.toml").write_bytes(b'name = "\xff"\n')
    return {k: str(d / v) for k, v in {
        "GOOD": "good.model", "BAD": "bad.model", "LATIN1": "latin1.model", "IR": "good.ir", "LATIN1IR": "latin1.ir",
        "GARBAGEIR": "garbage.ir", "FILE": "blocker", "DIR": "folder", "DIRMODEL": "folder.model", "HF": "hf",
        "HFBAD": "hf-bad", "CHIP": "chip.toml", "BADCHIP": "badchip.toml", "LATIN1CHIP": "latin1.toml",
        "MISSING": "missing.model", "UNDER_FILE": "blocker/x.ir", "UNDER_MISSING": "nodir/x.ir",
        "OUT": "out.ir", "DUMP": "dumps", "PNG_MISSING": "nodir/p.png", "PNG_BADEXT": "p.bogus",
    }.items()}


INPUTS = ["GOOD", "GOOD", "GOOD", "BAD", "LATIN1", "IR", "LATIN1IR", "GARBAGEIR", "FILE", "DIR", "DIRMODEL", "MISSING",
          "UNDER_FILE", str(ROOT / "examples" / "tiny-mqa.model")]
BIG = ["0", "-1", "-5", "x", "", "1e3", "4611686018427387904", "9999999999999999999999999", "10000000000"]
VALUES: dict[str, list[str]] = {
    "--mesh": ["1", "x=2", "x=2,y=2", "x=2,y=2,z=2", "x=3", "bogus", "x=0", "x=-1", "", "x=2,x=2", "x=99999999999", "=2"],
    "--phase": ["prefill", "decode", "bogus", ""],
    "--batch": ["1", "2", "4", "3", *BIG],
    "--seq": ["4", "8", "3", *BIG],
    "--ffn": ["1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz", "auto", "nope", ""],
    "--attn": ["heads", "batch", "auto", "x"],
    "--weights": ["f32", "bf16", "int8", "fp4", "DIR", "FILE", "HF", "MISSING"],
    "--overlap": ["none", "looped", "bidirectional", "x"],
    "--hardware": ["tpu-v4", "h100", "nope", "CHIP", "BADCHIP", "LATIN1CHIP", "MISSING", "DIR", "x.toml"],
    "--set": ["model.layers=2", "serve.batch=0", "model.heads=3", "bogus", "model.x=1", "serve.kv=pad",
              "serve.kv=replicate", "model.vocab=30", "model.d_model=18", "serve.logits=all", "model.layers=-1",
              "mesh.x=2", "serve.seq=99999999999999999999", "serve.pad=false", "serve.pad=maybe", "model.d_ff=30"],
    "--passes": ["", "cleanup", "cleanp", "quantize-int8,pad-heads{multiple=3}", "shard{ffn=2d-ws}", "{",
                 "cleanup{max_rounds=1}", "pad-heads{multiple=0}", "shard,insert-collectives,cleanup", "cleanup,,",
                 "fuse-parallel-block,quantize-int8", "collective-einsum", "pad-dims{d_ff=3,d_model=4,batch=8}",
                 "quantize-int8,pad-dims{d_ff=3}", "pad-dims{batch=-1}", "pad-dims,pad-heads"],
    "--print-ir-after": ["cleanup", "shard", "nope"],
    "--print-ir-before": ["cleanup", "shard", "nope"],
    "--dump-dir": ["DUMP", "FILE", "UNDER_FILE", "DIR"],
    "-o": ["OUT", "DIR", "UNDER_FILE", "UNDER_MISSING", "FILE"],
    "--emit": ["ir", "none", "x"],
    "--steps": ["0", "1", "2", *BIG],
    "--prompt-len": ["1", "3", *BIG],
    "--seed": ["0", "7", "-1", "x", "9223372036854775808", "18446744073709551616"],
    "--tolerance": ["1e-3", "0", "-1", "nan", "inf", "x", "1e-30", "-inf"],
    "--devices": ["1", "8", "0", "-1", "4", "100000", "x"],
    "--kv-fraction": ["0.5", "0", "1", "1.5", "nan", "x", "-0.1"],
    "--pareto": ["PNG_MISSING", "PNG_BADEXT", "DIR", "FILE"],
    "--batches": ["1,4", "0", "x", "", "1,,2", "-3"],
    "--checkpoint": ["DIR", "MISSING", "FILE", "HF"],
}
SWITCHES = ["--check", "--json", "--spmd", "--pass-stats", "--time-passes", "--print-ir-after-all", "--no-pad",
            "--no-verify-each", "--print-ir-after-change", "--help", "--bogus"]
COMMANDS = ["compile", "compile", "compile", "run", "run", "explain", "passes", "spec-from-hf", "nonsense"]


@st.composite
def command_lines(draw, files: dict[str, str]) -> list[str]:
    def resolve(v: str) -> str:
        return files.get(v, v)

    cmd = draw(st.sampled_from(COMMANDS))
    argv = [cmd]
    if cmd == "spec-from-hf":
        argv.append(resolve(draw(st.sampled_from(["HF", "HFBAD", "DIR", "FILE", "MISSING"]))))
    elif cmd != "passes" and draw(st.integers(0, 9)):
        argv.append(resolve(draw(st.sampled_from(INPUTS))))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 7:
            flag = draw(st.sampled_from(sorted(VALUES)))
            value = resolve(draw(st.sampled_from(VALUES[flag])))
            argv += [f"{flag}={value}"] if draw(st.booleans()) and flag != "-o" else [flag, value]
        elif kind < 9:
            argv.append(draw(st.sampled_from(SWITCHES)))
        else:
            argv.append(draw(st.text(max_size=12)))
    return argv


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage errors and --help
            rc = e.code if isinstance(e.code, int) else EXIT_USAGE
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def simulator_for_jax():
    """``run`` executes with the numpy SPMD simulator instead of JAX (same interface)."""
    import runtime.lower_jax
    from runtime.spmd import SpmdExecutor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.lower_jax, "JaxExecutor", SpmdExecutor)
        yield


def _examples(ci: int) -> int:
    """``ci`` examples under the ci profile, the profile's own count when larger (make fuzz)."""
    return max(ci, settings.default.max_examples)


def test_cli_never_shows_a_traceback(files, simulator_for_jax) -> None:
    @settings(max_examples=_examples(300), deadline=None, suppress_health_check=list(HealthCheck))
    @given(command_lines(files))
    def check(argv: list[str]) -> None:
        rc, err = run_cli(argv)
        assert "Traceback" not in err, (argv, err)
        assert rc in (EXIT_OK, EXIT_ERROR, EXIT_USAGE), (argv, rc, err)
        if rc == EXIT_ERROR and "check" not in err:
            assert err.strip(), argv  # a documented error says what went wrong

    check()


def test_pipeline_strings_parse_or_raise_pass_error() -> None:
    from ir.errors import PassError
    from passes.pipeline import format_pipeline, parse_pipeline

    alphabet = st.sampled_from(list("{},= \t") + ["cleanup", "shard", "pad-heads", "max_rounds", "ffn", "1", "x",
                                                  "true", "multiple", "-", "é", "\x00", "\n"])

    @settings(max_examples=_examples(300), deadline=None)
    @given(st.lists(alphabet, max_size=20).map("".join))
    def check(text: str) -> None:
        try:
            p = parse_pipeline(text)
        except PassError as e:
            assert e.loc is not None and e.render()
            return
        assert parse_pipeline(format_pipeline(p)) == p

    check()
