"""``insert-collectives``: each ``reshard`` becomes the cheapest sequence of collectives.

Partial sums are reduce-scattered onto a dim the target shards (else all-reduced), axes that
leave one dim for another move with an all-to-all, axes that must go are all-gathered (as
suffixes), and axes that must be added to a replicated dim are a local slice (no traffic).
The collectives keep the reshard's reason, so the ledger says where each came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir.builder import Namer
from ir.collectives import AllGather, AllReduce, AllToAll, LocalSlice, ReduceScatter
from ir.errors import PassError
from ir.module import Function, Module
from ir.ops import Op
from ir.types import TensorType
from passes.base import Pass, PassResult
from passes.ledger import format_ledger, ledger
from passes.registry import register
from passes.shard import common_prefix


def _axes(t: TensorType) -> dict[str, tuple[str, ...]]:
    return {d.name: d.axes for d in t.dims}


def plan(src: TensorType, dst: TensorType, mesh: dict[str, int]) -> list[tuple[type[Op], dict]]:
    """The collective steps from ``src`` to ``dst`` (same logical tensor)."""
    steps: list[tuple[type[Op], dict]] = []
    cur = src
    ctx = _Ctx(mesh)

    def apply(cls: type[Op], **attrs) -> None:
        nonlocal cur
        probe = cls(results=(), operands=(), types=(), **attrs)
        cur = probe.infer((cur,), ctx)[0]
        steps.append((cls, attrs))

    # 1. partial sums: reduce-scatter onto a dim whose target extends it with those axes
    #    (slicing first any leading axes the dim gains for free, so less data is reduced)
    pending = [a for a in mesh if a in cur.partial - dst.partial]
    for d in dst.dims:
        c, t = _axes(cur)[d.name], d.axes
        if t[: len(c)] != c:
            continue
        ext = t[len(c):]
        lead = 0
        while lead < len(ext) and ext[lead] not in pending and ext[lead] not in cur.mesh_axes:
            lead += 1
        if lead < len(ext) and ext[lead] in pending and lead:
            apply(LocalSlice, axes=ext[:lead], dim=d.name)
            ext = ext[lead:]
        k = 0
        while k < len(ext) and ext[k] in pending:
            k += 1
        if k:
            apply(ReduceScatter, axes=ext[:k], dim=d.name)
            pending = [a for a in pending if a not in ext[:k]]
    if pending:
        apply(AllReduce, axes=tuple(pending))
    # 2. axes that must leave a dim: all-to-all to a dim that wants them, else all-gather
    for _ in range(2 * len(dst.dims) + 2):
        ax, want = _axes(cur), _axes(dst)
        moved = False
        for dname, c in ax.items():
            keep = common_prefix(c, want[dname])
            drop = c[len(keep):]
            if not drop:
                continue
            for d2, c2 in ax.items():
                ext2 = want[d2][len(c2):] if d2 != dname and want[d2][: len(c2)] == c2 else ()
                if ext2 and drop[: len(ext2)] == ext2 and len(drop) > len(ext2):
                    # the target takes only the leading axes: move them all when the dim can hold
                    # them (then gather the rest there, on a smaller block), else gather first
                    n = math.prod(mesh[a] for a in c2 + drop)
                    if cur.size(d2) % n == 0:
                        apply(AllToAll, axes=drop, split_dim=d2, concat_dim=dname)
                        apply(AllGather, axes=drop[len(ext2):], dim=d2)
                    else:
                        apply(AllGather, axes=drop[len(ext2):], dim=dname)
                        apply(AllToAll, axes=ext2, split_dim=d2, concat_dim=dname)
                    moved = True
                    break
                if ext2 and ext2[: len(drop)] == drop:
                    apply(AllToAll, axes=drop, split_dim=d2, concat_dim=dname)
                    moved = True
                    break
            if moved:
                break
            apply(AllGather, axes=drop, dim=dname)
            moved = True
            break
        if not moved:
            break
    # 3. axes a replicated dim must gain: a local slice
    for d in dst.dims:
        c = _axes(cur)[d.name]
        if d.axes[: len(c)] == c and len(d.axes) > len(c):
            apply(LocalSlice, axes=d.axes[len(c):], dim=d.name)
    if cur != dst:
        raise PassError(f"insert-collectives: no plan from {src} to {dst} (reached {cur})")
    return steps


class _Ctx:
    def __init__(self, mesh: dict[str, int]):
        self.mesh = mesh

    def function(self, name: str):
        raise PassError("collectives do not call functions")


def expand(fn: Function, mesh: dict[str, int]) -> tuple[Function, dict[str, int]]:
    taken = {p.name for p in fn.params} | {r for op in fn.ops for r in op.results}
    namer = Namer(taken)
    counts: dict[str, int] = {}
    types = dict(fn.value_types)
    ops: list[Op] = []
    rename: dict[str, str] = {}
    for op in fn.ops:
        op = op.with_(operands=tuple(rename.get(o, o) for o in op.operands))
        if op.kind != "reshard":
            ops.append(op)
            continue
        v = op.operands[0]
        steps = plan(types[v], op.type, mesh)
        if not steps:
            rename[op.result] = v
            continue
        cur = v
        for i, (cls, attrs) in enumerate(steps):
            probe = cls(results=(), operands=(cur,), types=(), reason=op.reason, **attrs)  # type: ignore[call-arg]
            t = probe.infer((types[cur],), _Ctx(mesh))[0]
            name = op.result if i == len(steps) - 1 else namer.fresh(cur)
            ops.append(probe.with_(results=(name,), types=(t,)))
            types[name] = t
            cur = name
            counts[cls.kind] = counts.get(cls.kind, 0) + 1
    returns = tuple(rename.get(r, r) for r in fn.returns)
    return fn.with_ops(ops, returns), counts


@register
@dataclass(frozen=True)
class InsertCollectives(Pass):
    """Expands every reshard into collectives and reports the collective ledger."""

    name = "insert-collectives"
    summary = "turn reshards into all-gather / reduce-scatter / all-reduce / all-to-all / local slices"
    runs_after = ("shard",)

    def run(self, module: Module) -> PassResult:
        mesh = module.mesh_sizes
        fns, stats = [], dict[str, int]()
        for fn in module.functions:
            new, counts = expand(fn, mesh)
            fns.append(new)
            for k, v in counts.items():
                stats[k] = stats.get(k, 0) + v
        out = module.with_functions(fns)
        entries = ledger(out)
        stats["ledger bytes per device per step"] = sum(e.per_step for e in entries)
        return PassResult(out, stats, tuple(format_ledger(entries)))
