"""Pipeline strings and the pass manager's instrumentation.

Pipeline strings parse and print back canonically (non-default options only), every problem
in one string is reported at once with a caret under the first, and option values are
converted by the option's type. The pass manager verifies between passes, dumps IR with
MLIR's headers to a sink, writes numbered files to a dump directory, and reports statistics
and timing — all checked here on the tiny examples and on test-only passes, which are
registered only inside the tests that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compiler.driver import build_for, compile_config
from compiler.spec import apply_overrides, load_spec
from ir.errors import PassError, VerifyError
from ir.module import Module
from ir.parser import parse_module
from ir.printer import print_module
from ir.verifier import verify
from passes.base import Pass, PassResult
from passes.cleanup import Cleanup
from passes.manager import Instrumentation, PassManager, format_stats, format_timing
from passes.pipeline import Pipeline, format_pipeline, parse_pipeline
from passes.registry import PASSES, all_passes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---- test-only passes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs(Pass):
    """Does nothing; has one option of every convertible type."""

    name = "test-knobs"
    flag: bool = False
    rounds: int = 3
    ratio: float = 0.5
    mode: str = "fast"

    def run(self, module: Module) -> PassResult:
        return PassResult(module, {"knob turns": self.rounds})


@dataclass(frozen=True)
class Corrupt(Pass):
    """Breaks the module: the first op's annotated result type gets the wrong dtype."""

    name = "test-corrupt"

    def run(self, module: Module) -> PassResult:
        fn = next(f for f in module.functions if f.ops)
        op = fn.ops[0]
        bad = op.with_(types=(op.type.with_dtype("f16" if op.type.dtype != "f16" else "f32"), *op.types[1:]))
        return PassResult(module.with_function(fn.with_ops((bad,) + fn.ops[1:])), {"corrupted": 1})


@dataclass(frozen=True)
class Raises(Pass):
    """Fails the way a pass that meets an ill-typed op while rebuilding fails."""

    name = "test-raises"

    def run(self, module: Module) -> PassResult:
        raise VerifyError("cannot rebuild %x")


@contextlib.contextmanager
def registered(*classes: type[Pass]) -> Iterator[None]:
    """Registers test passes for the duration of a block, then removes them again."""
    all_passes()  # load the real ones first
    for c in classes:
        assert c.name not in PASSES
        PASSES[c.name] = c
    try:
        yield
    finally:
        for c in classes:
            PASSES.pop(c.name, None)


def tiny(name: str = "tiny-mqa", phase: str = "decode") -> Module:
    spec = apply_overrides(load_spec(EXAMPLES / f"{name}.model"), phase=phase)
    return build_for(spec, compile_config(spec))


DEAD = """\
module @m {
  entry func @f(
      %x: f32[B=4]
  ) -> (f32[B=4]) {
    %a = scale(%x) {factor = 1.0} : f32[B=4]
    %b = unary(%a) {fn = "neg"} : f32[B=4]
    %c = unary(%a) {fn = "neg"} : f32[B=4]
    %d = binary(%b, %c) {fn = "add"} : f32[B=4]
    %e = unary(%x) {fn = "exp"} : f32[B=4]
    return %d
  }
}
"""


# ---- pipeline strings ------------------------------------------------------------------------


def test_registry_is_kebab_case() -> None:
    names = all_passes()
    assert "cleanup" in names
    for name, cls in names.items():
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name), name
        assert cls.name == name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


@pytest.mark.parametrize("text, canonical", [
    ("cleanup", "cleanup"),
    (" cleanup , cleanup ", "cleanup,cleanup"),
    ("cleanup{max_rounds=16}", "cleanup"),  # default options are not printed
    ("cleanup{ max_rounds = 4 }", "cleanup{max_rounds=4}"),
    ("cleanup{}", "cleanup"),
    ("cleanup{max_rounds=4,}", "cleanup{max_rounds=4}"),
    ("", ""),
    ("   ", ""),
])
def test_canonical_printing(text: str, canonical: str) -> None:
    p = parse_pipeline(text)
    assert str(p) == canonical
    assert parse_pipeline(str(p)) == p


def test_names_and_options_are_typed() -> None:
    with registered(Knobs):
        p = parse_pipeline("test-knobs{flag=true,rounds=-2,ratio=1e-3,mode=slow},cleanup{max_rounds=2}")
    assert p.names() == ("test-knobs", "cleanup")
    assert p.passes[0] == Knobs(flag=True, rounds=-2, ratio=0.001, mode="slow")
    assert p.passes[1] == Cleanup(max_rounds=2)
    assert format_pipeline(p) == "test-knobs{flag=true,rounds=-2,ratio=0.001,mode=slow},cleanup{max_rounds=2}"


WORD = st.from_regex(r"[A-Za-z0-9_.+\-]{1,10}", fullmatch=True)


@st.composite
def pipelines(draw) -> Pipeline:
    passes: list[Pass] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["cleanup", "knobs"]))
        if kind == "cleanup":
            passes.append(Cleanup(**draw(st.fixed_dictionaries({}, optional={"max_rounds": st.integers(1, 10**12)}))))
        else:
            passes.append(Knobs(**draw(st.fixed_dictionaries({}, optional={
                "flag": st.booleans(),
                "rounds": st.integers(),
                "ratio": st.floats(allow_nan=False),
                "mode": WORD,
            }))))
    return Pipeline(tuple(passes))


@given(pipelines())
def test_print_parse_roundtrip(p: Pipeline) -> None:
    with registered(Knobs):
        text = format_pipeline(p)
        again = parse_pipeline(text)
        assert again == p
        assert format_pipeline(again) == text


@given(pipelines(), st.data())
def test_whitespace_around_names_and_options_is_insignificant(p: Pipeline, data: st.DataObject) -> None:
    text = format_pipeline(p)
    spaced = "".join(c + data.draw(st.sampled_from(["", " ", "  "])) if c in ",{}=" else c for c in text)
    with registered(Knobs):
        assert parse_pipeline(" " + spaced + " ") == p


def render_error(text: str) -> str:
    with pytest.raises(PassError) as ei:
        parse_pipeline(text)
    return ei.value.render()


def test_unknown_names_are_reported_all_at_once() -> None:
    names = ", ".join(sorted(all_passes()))
    assert render_error("cleanp,cleanup{max_round=3},nope") == "\n".join([
        "<pipeline>:1:1: pass error: unknown pass 'cleanp'; pass 'cleanup' has no option 'max_round'; "
        "unknown pass 'nope'",
        "  cleanp,cleanup{max_round=3},nope",
        "  ^~~~~~",
        f"  hint: did you mean 'cleanup'? valid choices: {names}",
    ])


def test_caret_under_the_first_problem() -> None:
    names = ", ".join(sorted(all_passes()))
    assert render_error("cleanup, cleaup") == "\n".join([
        "<pipeline>:1:10: pass error: unknown pass 'cleaup'",
        "  cleanup, cleaup",
        "           ^~~~~~",
        f"  hint: did you mean 'cleanup'? valid choices: {names}",
    ])


def test_unknown_option_did_you_mean() -> None:
    assert render_error("cleanup{max_round=3}") == "\n".join([
        "<pipeline>:1:9: pass error: pass 'cleanup' has no option 'max_round'",
        "  cleanup{max_round=3}",
        "          ^~~~~~~~~",
        "  hint: did you mean 'max_rounds'? valid choices: max_rounds",
    ])


def test_unknown_option_far_from_any() -> None:
    with registered(Knobs):
        err = render_error("test-knobs{speed=3}")
    assert err.splitlines()[0] == "<pipeline>:1:12: pass error: pass 'test-knobs' has no option 'speed'"
    assert err.splitlines()[-1] == "  hint: valid choices: flag, mode, ratio, rounds"


@pytest.mark.parametrize("text, first_line", [
    ("cleanup{max_rounds=abc}",
     "<pipeline>:1:9: pass error: bad value for cleanup.max_rounds: 'abc' "
     "(expected an integer)"),
    ("cleanup{max_rounds=2.5}",
     "<pipeline>:1:9: pass error: bad value for cleanup.max_rounds: '2.5' "
     "(expected an integer)"),
    ("cleanup{max_rounds}", "<pipeline>:1:9: pass error: option 'max_rounds' of 'cleanup' needs a value (key=value)"),
    ("test-knobs{flag=yes}", "<pipeline>:1:12: pass error: bad value for test-knobs.flag: 'yes' (expected true or false)"),
    ("test-knobs{ratio=fast}",
     "<pipeline>:1:12: pass error: bad value for test-knobs.ratio: 'fast' (could not convert string to float: 'fast')"),
    ("cleanup,,cleanup", "<pipeline>:1:9: pass error: empty pass name"),
    ("cleanup}", "<pipeline>:1:8: pass error: unbalanced '}' in pipeline"),
    ("cleanup{max_rounds=2", "<pipeline>:1:20: pass error: unclosed '{' in pipeline"),
    ("cleanup{max_rounds=2}x", "<pipeline>:1:22: pass error: unexpected 'x'; expected ','"),
    ("cleanup,", "<pipeline>:1:8: pass error: empty pass name"),
    ("cleanup{,}", "<pipeline>:1:9: pass error: empty option"),
    ("cleanup{max_rounds=2=3}", "<pipeline>:1:21: pass error: unexpected '='; expected ',' or '}'"),
    ("cleanup{a{b}}", "<pipeline>:1:10: pass error: unexpected '{'; expected ',' or '=' or '}'"),
])
def test_bad_values_and_syntax(text: str, first_line: str) -> None:
    with registered(Knobs):
        err = render_error(text)
    assert err.splitlines()[0] == first_line
    assert err.splitlines()[1] == "  " + text
    assert err.splitlines()[2].lstrip().startswith("^")


def test_bad_values_of_several_passes_together() -> None:
    with registered(Knobs):
        err = render_error("test-knobs{flag=1,rounds=x},cleanup{max_rounds=y}")
    assert err.splitlines()[0] == (
        "<pipeline>:1:12: pass error: bad value for test-knobs.flag: '1' (expected true or false); "
        "bad value for test-knobs.rounds: 'x' (expected an integer); "
        "bad value for cleanup.max_rounds: 'y' (expected an integer)")


def test_option_given_twice_is_an_error() -> None:
    assert "option 'max_rounds' of 'cleanup' given twice" in render_error("cleanup{max_rounds=1,max_rounds=2}")


# ---- the pass manager ------------------------------------------------------------------------


def run_pm(pipeline: str | Pipeline, module: Module, **instr) -> tuple[list[str], object]:
    out: list[str] = []
    pipe = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    res = PassManager(pipe, Instrumentation(**instr), out.append).run(module)
    return out, res


AFTER = "// -----// IR Dump After Cleanup (cleanup) //----- //"
BEFORE = "// -----// IR Dump Before Cleanup (cleanup) //----- //"


def test_cleanup_result_and_records() -> None:
    m = parse_module(DEAD)
    dumps, res = run_pm("cleanup", m)
    assert dumps == []
    assert print_module(res.module) == """\
module @m {
  entry func @f(
      %x: f32[B=4]
  ) -> (f32[B=4]) {
    %b = unary(%x) {fn = "neg"} : f32[B=4]
    %d = binary(%b, %b) {fn = "add"} : f32[B=4]
    return %d
  }
}
"""
    (r,) = res.records
    assert (r.index, r.name, r.spelled, r.changed) == (1, "cleanup", "cleanup", True)
    assert r.stats == {"fold-identity matches": 1, "reshard-noop matches": 0, "reshard-chain matches": 0,
                       "rs-ag-to-ar matches": 0, "ag-of-slice matches": 0, "slice-of-ag matches": 0,
                       "a2a-pair matches": 0, "cse matches": 1, "dce matches": 1,
                       "dead-functions matches": 0, "rounds": 2}
    assert r.seconds >= 0 and res.total_seconds >= r.seconds


def test_print_ir_after_all() -> None:
    m = parse_module(DEAD)
    dumps, res = run_pm("cleanup,cleanup", m, print_ir_after_all=True)
    assert len(dumps) == 2
    assert all(d.startswith(AFTER + "\n") for d in dumps)
    assert dumps[1] == AFTER + "\n" + print_module(res.module)
    assert [r.changed for r in res.records] == [True, False]


def test_print_ir_after_and_before_name() -> None:
    m = parse_module(DEAD)
    with registered(Knobs):
        dumps, _ = run_pm("test-knobs,cleanup", m, print_ir_after=frozenset({"cleanup"}),
                          print_ir_before=frozenset({"cleanup", "test-knobs"}))
    heads = [d.splitlines()[0] for d in dumps]
    assert heads == ["// -----// IR Dump Before Knobs (test-knobs) //----- //", BEFORE, AFTER]
    assert dumps[1] == BEFORE + "\n" + DEAD  # cleanup's input, as printed


def test_print_ir_after_change_skips_unchanged() -> None:
    m = parse_module(DEAD)
    with registered(Knobs):
        dumps, res = run_pm("test-knobs,cleanup,cleanup,test-knobs", m, print_ir_after_change=True)
    assert [d.splitlines()[0] for d in dumps] == [AFTER]
    assert [r.changed for r in res.records] == [False, True, False, False]


def test_dump_dir_numbered_files(tmp_path: Path) -> None:
    m = tiny()
    with registered(Knobs):
        _, res = run_pm("cleanup,test-knobs{rounds=5},cleanup", m, dump_dir=tmp_path / "dumps")
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["00-input.ir", "01-cleanup.ir", "02-test-knobs.ir", "03-cleanup.ir"]
    assert (tmp_path / "dumps" / "00-input.ir").read_text() == print_module(m)
    assert (tmp_path / "dumps" / "03-cleanup.ir").read_text() == print_module(res.module)
    for f in files:  # every dump is valid IR that verifies
        verify(parse_module((tmp_path / "dumps" / f).read_text(), f))


def test_verify_each_catches_a_broken_pass() -> None:
    m = tiny()
    with registered(Corrupt):
        pipe = parse_pipeline("cleanup,test-corrupt,cleanup")
    with pytest.raises(VerifyError) as ei:
        run_pm(pipe, m)
    err = ei.value.render()
    head, src, caret = err.splitlines()
    assert head.startswith("<the output of pass 'test-corrupt'>:")
    assert re.search(r":\d+:5: verify error: the output of pass 'test-corrupt' is invalid: "
                     r"%x is annotated f16\[B=8, L=1, E=64\] but embed gives f32\[B=8, L=1, E=64\]$", head)
    assert src.strip() == "%x = embed(%embed, %tokens) : f16[B=8, L=1, E=64]"
    assert caret.strip() == "^" + "~" * (len(src.strip()) - 1)
    line = int(head.split(":")[1])
    printed = print_module(Corrupt().run(m).module).splitlines()
    assert printed[line - 1] == src[2:]


def test_without_verify_each_the_broken_module_comes_out() -> None:
    m = tiny()
    _, res = run_pm(Pipeline((Corrupt(),)), m, verify_each=False)
    assert res.records[0].stats == {"corrupted": 1}
    with pytest.raises(VerifyError):
        verify(res.module)


def test_invalid_input_is_reported_before_any_pass() -> None:
    m = parse_module(DEAD.replace("%d = binary(%b, %c) {fn = \"add\"} : f32[B=4]",
                                  "%d = binary(%b, %c) {fn = \"add\"} : f64[B=4]"), "dead.ir")
    with pytest.raises(VerifyError) as ei:
        run_pm("cleanup", m)
    assert ei.value.render() == "\n".join([
        "dead.ir:8:5: verify error: the input is invalid: %d is annotated f64[B=4] but binary gives f32[B=4]",
        "      %d = binary(%b, %c) {fn = \"add\"} : f64[B=4]",
        "      ^",
    ])


def test_verify_error_inside_a_pass_becomes_a_pass_error() -> None:
    with pytest.raises(PassError, match=r"^pass error: pass 'test-raises' failed: cannot rebuild %x$"):
        run_pm(Pipeline((Raises(),)), parse_module(DEAD))


def test_test_passes_are_not_left_registered() -> None:
    assert not {"test-knobs", "test-corrupt", "test-raises"} & set(all_passes())


# ---- statistics and timing reports -----------------------------------------------------------


def test_pass_stats_text() -> None:
    with registered(Knobs):
        _, res = run_pm("cleanup,test-knobs{rounds=7}", parse_module(DEAD))
    rule = "===" + "-" * 60 + "==="
    assert format_stats(res.records) == "\n".join([
        rule,
        "                      ... Pass statistics report ...",
        rule,
        "cleanup",
        "         1  fold-identity matches",
        "         0  reshard-noop matches",
        "         0  reshard-chain matches",
        "         0  rs-ag-to-ar matches",
        "         0  ag-of-slice matches",
        "         0  slice-of-ag matches",
        "         0  a2a-pair matches",
        "         1  cse matches",
        "         1  dce matches",
        "         0  dead-functions matches",
        "         2  rounds",
        "test-knobs{rounds=7}",
        "         7  knob turns",
    ])


def test_pass_stats_without_statistics() -> None:
    @dataclass(frozen=True)
    class Quiet(Pass):
        name = "test-quiet"

        def run(self, module: Module) -> PassResult:
            return PassResult(module)

    _, res = run_pm(Pipeline((Quiet(),)), parse_module(DEAD))
    assert format_stats(res.records).splitlines()[3:] == ["test-quiet", "  (no statistics)"]


def test_time_passes_text() -> None:
    _, res = run_pm("cleanup,cleanup{max_rounds=1}", tiny())
    text = format_timing(res.records, res.total_seconds)
    lines = text.splitlines()
    assert lines[1].strip() == "... Execution time report ..."
    assert re.fullmatch(r"  Total Execution Time: \d+\.\d{4} seconds", lines[3])
    assert lines[5] == "  ----Wall Time----  ----Name----"
    assert re.fullmatch(r"  +\d+\.\d{4} \( *\d+\.\d%\)  cleanup", lines[6])
    assert re.fullmatch(r"  +\d+\.\d{4} \( *\d+\.\d%\)  cleanup\{max_rounds=1\}", lines[7])
    assert re.fullmatch(r"  +\d+\.\d{4} \(100\.0%\)  Total", lines[8])
    assert len(lines) == 9


def test_time_passes_with_zero_total() -> None:
    _, res = run_pm("cleanup", parse_module(DEAD))
    text = format_timing(res.records, 0.0)
    assert "(  0.0%)  cleanup" in text
