"""The pass manager: runs a pipeline with MLIR-style instrumentation between passes.

Verification runs after every pass unless turned off. Dumps (``--print-ir-after-all``,
``--print-ir-after=NAME``, ``--print-ir-before=NAME``, ``--print-ir-after-change``) go to a
sink supplied by the caller, with MLIR's headers; ``--dump-dir`` writes numbered files.
The manager, not the passes, does all output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ir.errors import PassError, VerifyError, did_you_mean
from ir.module import Module
from ir.printer import print_module
from ir.textfile import ensure_dir, write_user_text
from ir.verifier import verify
from passes.base import Pass
from passes.pipeline import Pipeline, format_pass, format_pipeline
from passes.registry import all_passes


@dataclass(frozen=True)
class Instrumentation:
    verify_each: bool = True
    print_ir_after_all: bool = False
    print_ir_after: frozenset[str] = frozenset()
    print_ir_before: frozenset[str] = frozenset()
    print_ir_after_change: bool = False
    dump_dir: Path | None = None


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its spelling in the pipeline, stats, notes, time, whether IR changed."""

    index: int
    name: str
    spelled: str
    stats: dict[str, int]
    notes: tuple[str, ...]
    seconds: float
    changed: bool


@dataclass
class PipelineRun:
    module: Module
    records: list[PassRecord] = field(default_factory=list)
    total_seconds: float = 0.0
    verify_seconds: float = 0.0


def dump_header(when: str, p: Pass) -> str:
    return f"// -----// IR Dump {when} {type(p).__name__} ({p.name}) //----- //"


class PassManager:
    def __init__(self, pipeline: Pipeline, instr: Instrumentation = Instrumentation(),
                 sink: Callable[[str], None] | None = None):
        check_order(pipeline)
        check_dump_names(pipeline, instr)
        self.pipeline, self.instr = pipeline, instr
        self.sink = sink or (lambda s: None)

    def _dump_file(self, index: int, label: str, module: Module) -> None:
        d = self.instr.dump_dir
        if d is None:
            return
        ensure_dir(d, "--dump-dir")
        write_user_text(d / f"{index:02d}-{label}.ir", print_module(module), "IR dump")

    def run(self, module: Module) -> PipelineRun:
        run = PipelineRun(module)
        t_v = time.perf_counter()
        if self.instr.verify_each:
            _verify(module, "the input")
        run.verify_seconds += time.perf_counter() - t_v
        self._dump_file(0, "input", module)
        start = time.perf_counter()
        for i, p in enumerate(self.pipeline.passes, start=1):
            if p.name in self.instr.print_ir_before:
                self.sink(dump_header("Before", p) + "\n" + print_module(run.module))
            t0 = time.perf_counter()
            try:
                res = p.run(run.module)
            except VerifyError as e:
                raise PassError(f"pass '{p.name}' failed: {e.message}", e.loc, e.hint) from None
            dt = time.perf_counter() - t0
            changed = res.module != run.module
            t_v = time.perf_counter()
            if self.instr.verify_each:
                _verify(res.module, f"the output of pass '{p.name}'")
            run.verify_seconds += time.perf_counter() - t_v
            run.module = res.module
            run.records.append(PassRecord(i, p.name, format_pass(p), dict(res.stats), res.notes, dt, changed))
            if (self.instr.print_ir_after_all or p.name in self.instr.print_ir_after
                    or (self.instr.print_ir_after_change and changed)):
                self.sink(dump_header("After", p) + "\n" + print_module(run.module))
            self._dump_file(i, p.name, run.module)
        run.total_seconds = time.perf_counter() - start
        return run


def check_order(pipeline: Pipeline) -> None:
    """Refuses a pipeline in which a pass runs before one its class says must precede it."""
    names = pipeline.names()
    for i, p in enumerate(pipeline.passes):
        late = [n for n in p.runs_after if n in names[i + 1:]]
        if late:
            raise PassError(f"pass '{late[0]}' must run before '{p.name}', but the pipeline runs it after: "
                            f"{format_pipeline(pipeline)}",
                            hint=f"'{p.name}' runs after {', '.join(p.runs_after)} when present; "
                                 f"put '{p.name}' after {', '.join(dict.fromkeys(late))}")


def check_dump_names(pipeline: Pipeline, instr: Instrumentation) -> None:
    """``--print-ir-after/before=NAME`` must name a pass the pipeline runs (else nothing would print)."""
    names = pipeline.names()
    for flag, wanted in (("--print-ir-after", instr.print_ir_after), ("--print-ir-before", instr.print_ir_before)):
        for name in sorted(wanted):
            if name not in names:
                why = f"the pipeline does not run '{name}'" if name in all_passes() else f"no pass is named '{name}'"
                raise PassError(f"{flag}={name}: {why}",
                                hint=did_you_mean(name, tuple(dict.fromkeys(names))) if names else
                                "the pipeline is empty")


def _verify(module: Module, what: str) -> None:
    try:
        verify(module, file=f"<{what}>")
    except VerifyError as e:
        raise VerifyError(f"{what} is invalid: {e.message}", e.loc, e.hint) from None


def format_stats(records: list[PassRecord]) -> str:
    """``--pass-stats``: one block per pass, statistics aligned, like LLVM's -stats."""
    lines = ["===" + "-" * 60 + "===", "                      ... Pass statistics report ...",
             "===" + "-" * 60 + "==="]
    for r in records:
        lines.append(f"{r.spelled}")
        if not r.stats and not r.notes:
            lines.append("  (no statistics)")
        for k, v in r.stats.items():
            lines.append(f"  {v:>8}  {k}")
        for n in r.notes:
            lines.append(f"  {n}")
    return "\n".join(lines)


def format_timing(records: list[PassRecord], total: float, verify: float = 0.0) -> str:
    """``--time-passes``: wall time per pass and its share, like MLIR's -mlir-timing."""
    lines = ["===" + "-" * 60 + "===", "                      ... Execution time report ...",
             "===" + "-" * 60 + "===", f"  Total Execution Time: {total:.4f} seconds", "",
             "  ----Wall Time----  ----Name----"]
    for r in records:
        share = 100.0 * r.seconds / total if total > 0 else 0.0
        lines.append(f"  {r.seconds:8.4f} ({share:5.1f}%)  {r.spelled}")
    if verify:
        share = 100.0 * verify / total if total > 0 else 0.0
        lines.append(f"  {verify:8.4f} ({share:5.1f}%)  (verifier)")
    lines.append(f"  {total:8.4f} (100.0%)  Total")
    return "\n".join(lines)
