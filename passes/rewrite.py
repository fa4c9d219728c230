"""Small rewrite rules in ordered tables, driven to a fixed point with a cap (tinygrad style).

A rule takes a module and returns the rewritten module and how many times it matched. The
driver applies the rules in order until none matches and reports a match count per rule,
which passes turn into their statistics; hitting the cap is a PassError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ir.errors import PassError
from ir.module import Function, Module
from ir.ops import Op

RuleFn = Callable[[Module], tuple[Module, int]]


@dataclass(frozen=True)
class Rule:
    name: str
    apply: RuleFn
    doc: str = ""


def drive(module: Module, rules: tuple[Rule, ...], cap: int = 16,
          owner: str = "rewrite") -> tuple[Module, dict[str, int], int]:
    """Applies ``rules`` to a fixed point; returns the module, match counts and rounds run.

    At most ``cap`` rounds may rewrite; a round in which no rule matches confirms the fixed point
    and ends it. If the round after the ``cap``-th still matches, the rules are not converging
    (or need more rounds): a PassError naming that round's rules, never a silently
    half-rewritten module.
    """
    counts = {r.name: 0 for r in rules}
    last: dict[str, int] = {}
    for rounds in range(1, cap + 2):
        last = {}
        for r in rules:
            module, n = r.apply(module)
            counts[r.name] += n
            if n:
                last[r.name] = n
        if not last:
            return module, counts, rounds
    fired = ", ".join(f"{k} ({v})" for k, v in last.items())
    raise PassError(f"{owner}: the rewrite rules still match after {cap} rounds (round {cap + 1}: {fired})",
                    hint="raise max_rounds if the rules converge slowly; two rules that undo each other never do")


def rename_uses(fn: Function, mapping: Mapping[str, str]) -> Function:
    """Rewrites operand and return names through ``mapping`` (following chains)."""

    def resolve(v: str) -> str:
        seen = set()
        while v in mapping and v not in seen:
            seen.add(v)
            v = mapping[v]
        return v

    ops = [op.with_(operands=tuple(resolve(o) for o in op.operands)) for op in fn.ops]
    return fn.with_ops(ops, tuple(resolve(r) for r in fn.returns))


def per_function(rewrite: Callable[[Function, Module], tuple[Function, int]]) -> RuleFn:
    """Lifts a function-level rewrite to a module-level rule."""

    def apply(m: Module) -> tuple[Module, int]:
        total, fns = 0, []
        for fn in m.functions:
            new, n = rewrite(fn, m)
            total += n
            fns.append(new)
        return (m.with_functions(fns), total) if total else (m, 0)

    return apply


def op_key(op: Op) -> tuple:
    """Identity of an op's computation, for common-subexpression elimination."""
    return (op.kind, op.operands, tuple(sorted(op.attrs().items(), key=lambda kv: kv[0])), op.types)
