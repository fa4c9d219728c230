"""``cleanup``: identity folding, common subexpressions, dead ops and dead functions.

Each rule is a small function in an ordered table (see passes/rewrite.py); the pass reports
how often each one matched.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.errors import PassError
from ir.graph import live_ops
from ir.module import Function, Module
from ir.ops import Scan
from passes.base import Pass, PassResult
from passes.registry import register
from passes.rewrite import Rule, drive, op_key, per_function, rename_uses


def _fold_identity(fn: Function, m: Module) -> tuple[Function, int]:
    """``scale`` by 1.0 and ``cast`` to the same dtype are their operand."""
    types = fn.value_types
    mapping, keep = {}, []
    for op in fn.ops:
        same_cast = op.kind == "cast" and types[op.operands[0]] == op.type
        unit_scale = op.kind == "scale" and op.factor == 1.0
        if same_cast or unit_scale:
            mapping[op.result] = op.operands[0]
        else:
            keep.append(op)
    if not mapping:
        return fn, 0
    return rename_uses(fn.with_ops(keep), mapping), len(mapping)


def _cse(fn: Function, m: Module) -> tuple[Function, int]:
    """Ops with the same kind, operands, attributes and types compute the same values."""
    seen: dict[tuple, tuple[str, ...]] = {}
    mapping: dict[str, str] = {}
    keep = []
    for op in fn.ops:
        op = op.with_(operands=tuple(mapping.get(o, o) for o in op.operands))
        key = op_key(op)
        if key in seen:
            mapping.update(zip(op.results, seen[key]))
        else:
            seen[key] = op.results
            keep.append(op)
    if not mapping:
        return fn, 0
    return rename_uses(fn.with_ops(keep), mapping), len(fn.ops) - len(keep)


def _dce(fn: Function, m: Module) -> tuple[Function, int]:
    """Ops whose results no returned value depends on."""
    live = live_ops(fn)
    if len(live) == len(fn.ops):
        return fn, 0
    return fn.with_ops([op for i, op in enumerate(fn.ops) if i in live]), len(fn.ops) - len(live)


def _dead_functions(m: Module) -> tuple[Module, int]:
    """Non-entry functions that no scan refers to."""
    used = {op.body.name for f in m.functions for op in f.ops if isinstance(op, Scan)}
    keep = [f for f in m.functions if f.entry or f.name in used]
    return (m.with_functions(keep), len(m.functions) - len(keep)) if len(keep) != len(m.functions) else (m, 0)


RULES: tuple[Rule, ...] = (
    Rule("fold-identity", per_function(_fold_identity), _fold_identity.__doc__ or ""),
    Rule("cse", per_function(_cse), _cse.__doc__ or ""),
    Rule("dce", per_function(_dce), _dce.__doc__ or ""),
    Rule("dead-functions", _dead_functions, _dead_functions.__doc__ or ""),
)


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Folds identities, merges common subexpressions and removes dead code, to a fixed point."""

    name = "cleanup"
    summary = "fold identities, CSE, dead code and dead functions"

    #: Most rounds of the rule table before giving up on a fixed point.
    max_rounds: int = 16

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise PassError(f"cleanup: max_rounds must be >= 1, got {self.max_rounds}")

    def run(self, module: Module) -> PassResult:
        out, counts, rounds = drive(module, RULES, self.max_rounds)
        stats = {f"{k} matches": v for k, v in counts.items()}
        stats["rounds"] = rounds
        return PassResult(out, stats)
