"""``collective-einsum``: all-gather→einsum and einsum→reduce-scatter pairs become looped
collective einsums that overlap their communication with their computation (reference §8).

A site is an all-gather whose result only feeds einsums (activations in weight-stationary
layouts, weights in weight-gathered ones), or a reduce-scatter whose operand is an einsum used
only by it. The pair becomes one ``collective_einsum`` op: a ring loop of ppermutes and partial
einsums (one-way), or two half-size rings running in opposite directions (``bidirectional``).
An einsum takes part in at most one loop; where a site cannot fire the notes say why, so the
ledger of every collective says whether it was overlapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir.collectives import CollectiveEinsum
from ir.errors import PassError
from ir.graph import users
from ir.module import PREPARE, Function, Module, ModuleContext
from ir.ops import Einsum, Op
from passes.base import Pass, PassResult
from passes.ledger import format_ledger, ledger
from passes.registry import register


def _first_term(spec: str, k: int) -> str:
    """The same einsum with operand ``k`` written first (of two)."""
    (terms, out) = spec.split("->")
    a, b = terms.split(",")
    return spec if k == 0 else f"{b},{a}->{out}"


@dataclass(frozen=True)
class Site:
    fn: str
    value: str
    kind: str
    fired: bool
    detail: str

    def note(self) -> str:
        verdict = "fired" if self.fired else "not fired"
        return f"@{self.fn} %{self.value} ({self.kind}): {verdict}: {self.detail}"


def _even(n: int) -> bool:
    return n % 2 == 0


def rewrite(fn: Function, ctx: ModuleContext, bidirectional: bool, sites: list[Site]) -> Function:
    """``fn`` with every all-gather -> einsums and einsum -> reduce-scatter pair that can loop
    turned into a collective einsum; each candidate site is recorded in ``sites``."""
    loops = _Loops(fn, ctx, bidirectional, sites)
    for i, op in enumerate(loops.ops):  # all_gather may move later ops earlier, never past ``i``
        if op.kind == "all_gather":
            loops.all_gather(i, op)
        elif op.kind == "reduce_scatter":
            loops.reduce_scatter(i, op)
    return loops.result()


class _Loops:
    """The state of one function's rewrite: its ops (reordered by hoisting), which einsums are
    already in a loop, and the replacements by op index (None: removed)."""

    def __init__(self, fn: Function, ctx: ModuleContext, bidirectional: bool, sites: list[Site]):
        self.fn, self.ctx, self.bidirectional, self.sites = fn, ctx, bidirectional, sites
        self.ops = list(fn.ops)
        self.types = fn.value_types
        self.uses = users(fn)
        self.taken: set[int] = set()  # einsums already in a loop
        self.replace: dict[int, Op | None] = {}  # op index -> new op (None: removed)

    def bidi(self, chunk: int) -> tuple[bool, str]:
        if not self.bidirectional:
            return False, "one-way ring"
        if _even(chunk):
            return True, "bidirectional ring"
        return False, f"one-way ring (bidirectional needs an even chunk, got {chunk})"

    def _skip(self, op: Op, why: str) -> None:
        self.sites.append(Site(self.fn.name, op.result, op.kind, False, why))

    def _all_gather_blocker(self, v: str, us: list[int]) -> str:
        """Why the all-gather of ``v`` cannot loop into its einsums ("" when it can)."""
        ops = self.ops
        if v in self.fn.returns:
            return "the gathered value is returned"
        if not us:
            return "unused"
        bad = [ops[j].kind for j in us if not isinstance(ops[j], Einsum) or len(ops[j].operands) != 2
               or ops[j].operands[0] == ops[j].operands[1]]
        if bad:
            return f"the gathered value also feeds {', '.join(sorted(set(bad)))}"
        if any(j in self.taken for j in us):
            return "an einsum it feeds is already in a loop"
        return ""

    def _hoist_stationary(self, v: str, us: list[int]) -> tuple[list[int], list[str]]:
        """Places the loop at the first einsum, whose stationary operands must exist by then:
        moves up those computed from earlier values (a dequantize). Returns the einsums' indices
        after the moves and the stationary operands still computed too late."""
        ops, producers = self.ops, self.fn.producers
        first = min(us)
        late = [ops[j].operands[1 - ops[j].operands.index(v)] for j in us
                if producers.get(ops[j].operands[1 - ops[j].operands.index(v)], -1) > first]
        for w in list(late):
            k = producers[w]
            if self.replace.get(k, ops[k]) is ops[k] and all(producers.get(o, -1) < first for o in ops[k].operands) \
                    and k not in self.replace:
                ops.insert(first, ops.pop(k))  # the same list the caller iterates: only later ops move
                self.fn = self.fn.with_ops(ops)
                self.uses, producers = users(self.fn), self.fn.producers
                us = self.uses.get(v, [])
                first = min(us)
                late.remove(w)
        return us, late

    def all_gather(self, i: int, op: Op) -> None:
        v = op.result
        us = self.uses.get(v, [])
        why = self._all_gather_blocker(v, us)
        if why:
            return self._skip(op, why)
        us, late = self._hoist_stationary(v, us)
        if late:
            return self._skip(op, f"stationary operand %{late[0]} is computed after the first einsum")
        ops, types, ctx = self.ops, self.types, self.ctx
        specs, others, results, rtypes = [], [], [], []
        for j in us:
            e = ops[j]
            k = e.operands.index(v)
            specs.append(_first_term(e.spec, k))
            others.append(e.operands[1 - k])
            results.append(e.result)
            rtypes.append(e.type)
        chunk = types[op.operands[0]].local_shape(ctx.mesh)[types[op.operands[0]].index(op.dim)]
        two, how = self.bidi(chunk)
        new: Op = CollectiveEinsum(results=tuple(results), operands=(op.operands[0], *others), types=(),
                                   collective="all_gather", axes=op.axes, dim=op.dim, specs=tuple(specs),
                                   bidirectional=two, reason=op.reason)
        new = new.with_(types=new.infer(tuple(types[o] for o in new.operands), ctx))
        if new.types != tuple(rtypes):
            raise PassError(f"collective-einsum: the loop at %{v} changes result types: {new.types} vs {rtypes}")
        self.replace[i] = None
        for j in us:
            self.replace[j] = None
            self.taken.add(j)
        self.replace[min(us)] = new
        self.sites.append(Site(self.fn.name, v, "all_gather", True,
                               f"{how} over {{{','.join(op.axes)}}} into {len(us)} einsum(s) "
                               + ", ".join(f"%{r}" for r in results)))

    def reduce_scatter(self, i: int, op: Op) -> None:
        v, src = op.result, op.operands[0]
        pj = self.fn.producers.get(src)
        prod = self.ops[pj] if pj is not None else None
        if pj is None or not isinstance(prod, Einsum) or len(prod.operands) != 2:
            made = "a parameter" if prod is None else "produced by " + prod.kind
            return self._skip(op, f"its operand is {made}, not an einsum")
        if self.uses.get(src, []) != [i] or src in self.fn.returns:
            return self._skip(op, "the einsum's result has other uses")
        if pj in self.taken:
            return self._skip(op, "the einsum is already in a loop (with its input all-gather)")
        t, ctx = self.types[src], self.ctx
        n = math.prod(ctx.mesh[a] for a in op.axes)
        two, how = self.bidi(t.local_shape(ctx.mesh)[t.index(op.dim)] // n)
        new: Op = CollectiveEinsum(results=(v,), operands=prod.operands, types=(), collective="reduce_scatter",
                                   axes=op.axes, dim=op.dim, specs=(prod.spec,), bidirectional=two, reason=op.reason)
        new = new.with_(types=new.infer(tuple(self.types[o] for o in new.operands), ctx))
        if new.types != op.types:
            raise PassError(f"collective-einsum: the loop at %{v} changes its type: {new.types} vs {op.types}")
        self.replace[pj] = None
        self.replace[i] = new
        self.taken.add(pj)
        self.sites.append(Site(self.fn.name, v, "reduce_scatter", True,
                               f"{how} over {{{','.join(op.axes)}}} from einsum %{src}"))

    def result(self) -> Function:
        if not self.replace:
            return self.fn
        out = [self.replace[i] if i in self.replace else op for i, op in enumerate(self.ops)]
        return self.fn.with_ops([op for op in out if op is not None])


@register
@dataclass(frozen=True)
class CollectiveEinsumPass(Pass):
    """Turns collective + einsum pairs into looped, overlapped collective einsums."""

    name = "collective-einsum"
    summary = "all-gather/reduce-scatter + einsum -> ppermute ring loops (one-way or bidirectional)"
    runs_after = ("shard", "insert-collectives", "quantize-int8")

    #: Send half of every chunk each way around the ring (both links of a torus axis busy).
    bidirectional: bool = False

    def run(self, module: Module) -> PassResult:
        if any(op.kind == "reshard" for f in module.functions for op in f.ops):
            raise PassError("collective-einsum: the module still has reshard ops; run insert-collectives first")
        ctx = ModuleContext(module)
        sites: list[Site] = []
        fns = [f if f.name == PREPARE else rewrite(f, ctx, self.bidirectional, sites) for f in module.functions]
        fired = [s for s in sites if s.fired]
        stats = {"sites": len(sites), "fired": len(fired), "not fired": len(sites) - len(fired)}
        out = module.with_functions(fns)
        return PassResult(out, stats, tuple(s.note() for s in sites) + tuple(ledger_with_sites(out, sites)))


def ledger_with_sites(module: Module, sites: list[Site]) -> list[str]:
    """The collective ledger, each entry saying whether its loop fired and, if not, why."""
    verdict = {(s.fn, s.value): s for s in sites}
    entries = ledger(module)
    lines = format_ledger(entries)
    out = [lines[0]]
    for e, line in zip(entries, lines[1:]):
        s = verdict.get((e.function, e.value))
        if e.looped:
            out.append(line)
        elif s is not None:
            out.append(f"{line} [not looped: {s.detail}]")
        else:
            out.append(f"{line} [not looped: not next to an einsum]")
    out += lines[1 + len(entries):]
    return out
