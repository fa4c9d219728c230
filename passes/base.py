"""The pass protocol: a frozen dataclass with a kebab-case name and typed options.

A pass maps a module to a new module plus named statistics. It never prints: whatever a user
should see about what it did goes into ``stats`` (counts) or ``notes`` (lines such as the
collective ledger), which the pass manager reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ir.module import Module


@dataclass(frozen=True)
class PassResult:
    module: Module
    stats: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pass:
    """Base class; subclasses are frozen dataclasses whose fields are the pass options."""

    name: ClassVar[str] = "pass"
    summary: ClassVar[str] = ""
    #: Passes that, when a pipeline has them, must run before this one (the pass manager refuses
    #: another order): e.g. shard after pad-heads, whose padded heads it partitions.
    runs_after: ClassVar[tuple[str, ...]] = ()

    def run(self, module: Module) -> PassResult:
        raise TypeError(f"pass {self.name} does not define run()")

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def non_default_options(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out
