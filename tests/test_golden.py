"""Golden IR: builder output per example and phase, and filecheck-like pass cases.

The file format is described in tests/golden/README.md. ``EINSHARD_UPDATE_GOLDEN=1`` rewrites
the expected parts from the actual results (read only here; the library takes no configuration
from the environment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from compiler.driver import build_for, compile_config, compile_module
from compiler.spec import apply_overrides, load_spec
from ir.errors import EinshardError
from ir.parser import parse_module
from ir.printer import print_module
from passes.pipeline import parse_pipeline

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("EINSHARD_UPDATE_GOLDEN") == "1"

SEPARATOR = "// -----"
DIRECTIVES = ("CHECK", "STAT", "ERROR")
BUILD_EXAMPLES = ("tiny-mqa", "tiny-gqa", "tiny-gptj", "tiny-mha")
PHASES = ("prefill", "decode")


# ---- builder output ------------------------------------------------------------------------


def build_text(example: str, phase: str) -> str:
    spec = apply_overrides(load_spec(ROOT / "examples" / f"{example}.model"), phase=phase)
    return print_module(build_for(spec, compile_config(spec)))


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("example", BUILD_EXAMPLES)
def test_build(example: str, phase: str) -> None:
    path = GOLDEN / f"build_{example}_{phase}.ir"
    got = build_text(example, phase)
    if UPDATE:
        path.write_text(got)
    assert path.exists(), f"missing {path.name}; run with EINSHARD_UPDATE_GOLDEN=1"
    assert got == path.read_text()


def test_no_stray_build_files() -> None:
    want = {f"build_{e}_{p}.ir" for e in BUILD_EXAMPLES for p in PHASES}
    assert {p.name for p in GOLDEN.glob("build_*.ir")} == want


# ---- pass cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    file: Path
    index: int
    first_line: int  # 1-based line of the case's first line in the file
    lines: tuple[str, ...]

    def directive(self, name: str) -> list[str]:
        out = []
        for line in self.lines:
            if line == f"// {name}:":
                out.append("")
            elif line.startswith(f"// {name}: "):
                out.append(line[len(f"// {name}: "):])
        return out

    @property
    def name(self) -> str:
        names = self.directive("CASE")
        return names[0] if names else f"line{self.first_line}"

    @property
    def text(self) -> str:
        """The case, padded so that line numbers are the golden file's."""
        return "\n" * (self.first_line - 1) + "\n".join(self.lines) + "\n"


def split_cases(path: Path) -> list[Case]:
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    cases, start, cur = [], 1, []
    for n, line in enumerate(lines, start=1):
        if line == SEPARATOR:
            cases.append(Case(path, len(cases), start, tuple(cur)))
            start, cur = n + 1, []
        else:
            cur.append(line)
    cases.append(Case(path, len(cases), start, tuple(cur)))
    return cases


def join_cases(cases: list[list[str]]) -> str:
    return ("\n" + SEPARATOR + "\n").join("\n".join(c) for c in cases) + "\n"


CASE_FILES = sorted(p for p in GOLDEN.glob("*.ir") if not p.name.startswith("build_"))
CASES = [c for f in CASE_FILES for c in split_cases(f)]


@dataclass
class Outcome:
    output: list[str]
    stats: list[str]
    error: list[str]


def run_case(case: Case) -> Outcome:
    runs = case.directive("RUN")
    assert len(runs) == 1, f"{case.file.name}:{case.first_line}: a case needs exactly one RUN line"
    try:
        pipeline = parse_pipeline(runs[0])
        module = parse_module(case.text, case.file.name)
        res = compile_module(module, str(pipeline))
    except EinshardError as e:
        return Outcome([], [], [ln.rstrip() for ln in e.render().split("\n")])
    stats = [f"{r.spelled}: {k} = {v}" for r in res.run.records for k, v in r.stats.items() if v]
    return Outcome(print_module(res.module).rstrip("\n").split("\n"), stats, [])


def rewrite(case: Case, got: Outcome) -> None:
    """Replaces the case's CHECK/STAT/ERROR directives in its file with ``got``."""
    cases = [list(c.lines) for c in split_cases(case.file)]
    kept = [ln for ln in cases[case.index] if not any(ln == f"// {d}:" or ln.startswith(f"// {d}: ") for d in DIRECTIVES)]
    while kept and not kept[-1].strip():
        kept.pop()
    new = [f"// ERROR: {ln}".rstrip() for ln in got.error]
    new += [f"// CHECK: {ln}".rstrip() for ln in got.output]
    new += [f"// STAT: {ln}" for ln in got.stats]
    cases[case.index] = kept + new
    case.file.write_text(join_cases(cases))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file.stem}:{c.name}" for c in CASES])
def test_case(case: Case) -> None:
    case = split_cases(case.file)[case.index]  # re-read: update mode may have moved lines
    got = run_case(case)
    if UPDATE:
        rewrite(case, got)
        case = split_cases(case.file)[case.index]
    want_error = case.directive("ERROR")
    if want_error:
        assert got.error == want_error, "\n".join(got.error) or "the run did not fail"
    else:
        assert not got.error, "unexpected error:\n" + "\n".join(got.error)
        assert case.directive("CHECK"), "a case needs CHECK lines or ERROR lines"
        assert got.output == case.directive("CHECK")
        assert got.stats == case.directive("STAT")


def test_case_names_are_unique() -> None:
    ids = [(c.file.name, c.name) for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_cleanup_rule_has_a_case() -> None:
    from passes.cleanup import RULES

    stats = "\n".join(ln for c in CASES if c.file.name == "cleanup.ir" for ln in c.directive("STAT"))
    for rule in RULES:
        assert f": {rule.name} matches = " in stats, f"no case fires cleanup rule {rule.name}"


# ---- round trip of every golden file -------------------------------------------------------


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("build_*.ir")), ids=lambda p: p.name)
def test_build_files_roundtrip(path: Path) -> None:
    text = path.read_text()
    m = parse_module(text, path.name)
    assert print_module(m) == text
    assert parse_module(print_module(m)) == m


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file.stem}:{c.name}" for c in CASES])
def test_case_files_roundtrip(case: Case) -> None:
    case = split_cases(case.file)[case.index]
    try:
        m = parse_module(case.text, case.file.name)
    except EinshardError:
        assert case.directive("ERROR"), "an input that does not parse must be an ERROR case"
        return
    once = print_module(m)
    assert print_module(parse_module(once)) == once
    assert parse_module(once) == m
    check = case.directive("CHECK")
    if check:
        text = "\n".join(check) + "\n"
        assert print_module(parse_module(text)) == text
