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
    ops = list(fn.ops)
    types = fn.value_types
    uses = users(fn)
    taken: set[int] = set()  # einsums already in a loop
    replace: dict[int, Op | None] = {}  # op index -> new op (None: removed)

    def bidi(chunk: int) -> tuple[bool, str]:
        if not bidirectional:
            return False, "one-way ring"
        if _even(chunk):
            return True, "bidirectional ring"
        return False, f"one-way ring (bidirectional needs an even chunk, got {chunk})"

    for i, op in enumerate(ops):
        if op.kind == "all_gather":
            v = op.result
            us = uses.get(v, [])
            why = ""
            if v in fn.returns:
                why = "the gathered value is returned"
            elif not us:
                why = "unused"
            else:
                bad = [ops[j].kind for j in us if not isinstance(ops[j], Einsum) or len(ops[j].operands) != 2
                       or ops[j].operands[0] == ops[j].operands[1]]
                if bad:
                    why = f"the gathered value also feeds {', '.join(sorted(set(bad)))}"
                elif any(j in taken for j in us):
                    why = "an einsum it feeds is already in a loop"
            if why:
                sites.append(Site(fn.name, v, "all_gather", False, why))
                continue
            # place the loop at the first einsum: its stationary operands must exist by then
            first = min(us)
            producers = fn.producers
            late = [ops[j].operands[1 - ops[j].operands.index(v)] for j in us
                    if producers.get(ops[j].operands[1 - ops[j].operands.index(v)], -1) > first]
            for w in list(late):  # hoist a stationary operand computed from earlier values (a dequantize)
                k = producers[w]
                if replace.get(k, ops[k]) is ops[k] and all(producers.get(o, -1) < first for o in ops[k].operands) \
                        and k not in replace:
                    ops.insert(first, ops.pop(k))
                    fn = fn.with_ops(ops)
                    uses, producers = users(fn), fn.producers
                    us = uses.get(v, [])
                    first = min(us)
                    late.remove(w)
            if late:
                sites.append(Site(fn.name, v, "all_gather", False,
                                  f"stationary operand %{late[0]} is computed after the first einsum"))
                continue
            specs, others, results, rtypes = [], [], [], []
            for j in us:
                e = ops[j]
                k = e.operands.index(v)
                specs.append(_first_term(e.spec, k))
                others.append(e.operands[1 - k])
                results.append(e.result)
                rtypes.append(e.type)
            chunk = types[op.operands[0]].local_shape(ctx.mesh)[types[op.operands[0]].index(op.dim)]
            two, how = bidi(chunk)
            new: Op = CollectiveEinsum(results=tuple(results), operands=(op.operands[0], *others), types=(),
                                       collective="all_gather", axes=op.axes, dim=op.dim, specs=tuple(specs),
                                       bidirectional=two, reason=op.reason)
            new = new.with_(types=new.infer(tuple(types[o] for o in new.operands), ctx))
            if new.types != tuple(rtypes):
                raise PassError(f"collective-einsum: the loop at %{v} changes result types: {new.types} vs {rtypes}")
            replace[i] = None
            for j in us:
                replace[j] = None
                taken.add(j)
            replace[first] = new
            sites.append(Site(fn.name, v, "all_gather", True,
                              f"{how} over {{{','.join(op.axes)}}} into {len(us)} einsum(s) "
                              + ", ".join(f"%{r}" for r in results)))
        elif op.kind == "reduce_scatter":
            v = op.result
            src = op.operands[0]
            pj = fn.producers.get(src)
            prod = ops[pj] if pj is not None else None
            why = ""
            if prod is None or not isinstance(prod, Einsum) or len(prod.operands) != 2:
                why = f"its operand is {'a parameter' if prod is None else 'produced by ' + prod.kind}, not an einsum"
            elif uses.get(src, []) != [i] or src in fn.returns:
                why = "the einsum's result has other uses"
            elif pj in taken:
                why = "the einsum is already in a loop (with its input all-gather)"
            if why:
                sites.append(Site(fn.name, v, "reduce_scatter", False, why))
                continue
            assert isinstance(prod, Einsum)  # else ``why`` was set
            t = types[src]
            n = 1
            for a in op.axes:
                n *= ctx.mesh[a]
            blk = t.local_shape(ctx.mesh)[t.index(op.dim)] // n
            two, how = bidi(blk)
            new = CollectiveEinsum(results=(v,), operands=prod.operands, types=(), collective="reduce_scatter",
                               axes=op.axes, dim=op.dim, specs=(prod.spec,), bidirectional=two, reason=op.reason)
            new = new.with_(types=new.infer(tuple(types[o] for o in new.operands), ctx))
            if new.types != op.types:
                raise PassError(f"collective-einsum: the loop at %{v} changes its type: {new.types} vs {op.types}")
            assert pj is not None
            replace[pj] = None
            replace[i] = new
            taken.add(pj)
            sites.append(Site(fn.name, v, "reduce_scatter", True,
                              f"{how} over {{{','.join(op.axes)}}} from einsum %{src}"))
    if not replace:
        return fn
    out: list[Op] = []
    for i, op in enumerate(ops):
        if i in replace:
            kept = replace[i]
            if kept is not None:
                out.append(kept)
        else:
            out.append(op)
    return fn.with_ops(out)


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
