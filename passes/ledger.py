"""The collective ledger: every collective of a module, where it came from and what it moves.

Bytes per device follow the paper's accounting (reference/partitioning.md §4.3): an all-gather
costs its per-device *output*, a reduce-scatter its per-device *input*, an all-reduce twice its
input (reduce-scatter + all-gather), an all-to-all its input. Ops inside a layer body run once
per layer; ``per_step`` multiplies by the scan's layer count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ir.module import PREPARE, Module
from ir.ops import Scan
from ir.pipeline_ops import Pipeline, PipelineGenerate
from ir.types import DTYPE_BYTES, TensorType


@dataclass(frozen=True)
class LedgerEntry:
    function: str
    value: str
    kind: str
    axes: tuple[str, ...]
    dims: str
    participants: int
    bytes_per_device: int
    repeats: int
    reason: str
    #: The mesh axes of each IR collective this entry stands for (more than one when a chain of
    #: gathers is priced as one).
    parts: tuple[tuple[str, ...], ...] = ()
    #: "" for a plain collective; "one-way" or "bidirectional" when a collective_einsum runs it
    #: as a ppermute ring overlapped with its einsums.
    looped: str = ""

    @property
    def per_step(self) -> int:
        return self.bytes_per_device * self.repeats

    def to_json(self) -> dict:
        d = asdict(self)
        d["axes"] = list(self.axes)
        d["parts"] = [list(p) for p in self.parts]
        d["bytes_per_step"] = self.per_step
        return d


def collective_bytes(kind: str, src: TensorType, dst: TensorType, mesh: dict[str, int]) -> int:
    if kind == "all_gather":
        return dst.local_nbytes(mesh)
    if kind == "all_reduce":
        return 2 * src.local_nbytes(mesh)
    return src.local_nbytes(mesh)


def repeats_of(module: Module) -> dict[str, int]:
    """How many times each function runs per call of its entry, on each device (layer bodies:
    N; a pipeline's stage body: once per schedule step, M + S - 1, and its layers N / S each)."""
    out = {f.name: 1 for f in module.entries}
    todo = list(module.entries)
    while todo:
        f = todo.pop()
        for op in f.ops:
            if isinstance(op, Scan):
                xs = [f.value_types[o] for o in op.operands[op.carry + op.consts:]]
                n = xs[0].size("N") if xs and xs[0].has("N") else 1
            elif isinstance(op, Pipeline):
                n = op.steps(module.mesh_sizes[op.axis])
            elif isinstance(op, PipelineGenerate):  # embed, stage body and head: once per step each
                n = op.steps(module.mesh_sizes[op.axis])
                for sym in (op.embed, op.head):
                    out[sym.name] = out[f.name] * n
                    todo.append(module.function(sym.name))
            else:
                continue
            out[op.body.name] = out[f.name] * n
            todo.append(module.function(op.body.name))
    return out


def _gather_chains(fn) -> dict[str, str]:
    """all_gather results that only feed another all_gather -> that consumer. A weight stored
    E{x} F{z,y} and gathered dim by dim is one gather in the paper's accounting: it costs the
    final output once, not each partial output."""
    uses: dict[str, list] = {}
    for op in fn.ops:
        for o in op.operands:
            uses.setdefault(o, []).append(op)
    out = {}
    for op in fn.ops:
        if op.kind == "all_gather":
            u = uses.get(op.result, [])
            if len(u) == 1 and u[0].kind == "all_gather" and op.result not in fn.returns:
                out[op.result] = u[0].result
    return out


def ledger(module: Module) -> list[LedgerEntry]:
    mesh = module.mesh_sizes
    reps = repeats_of(module)
    out: list[LedgerEntry] = []
    for fn in module.functions:
        if fn.name == PREPARE:
            continue  # load time, not per step
        types = fn.value_types
        chained = _gather_chains(fn)
        folded: dict[str, list[tuple[tuple[str, ...], str]]] = {}  # consumer -> (axes, dim) gathered before
        for op in fn.ops:
            if op.kind == "collective_einsum":
                (src, dst), _ = op.parts(tuple(types[o] for o in op.operands), _Ctx(mesh))
                out.append(LedgerEntry(fn.name, op.result, op.collective, op.axes, op.dim,
                                       math.prod(mesh[a] for a in op.axes),
                                       collective_bytes(op.collective, src, dst, mesh), reps.get(fn.name, 1),
                                       op.reason, (op.axes,),
                                       "bidirectional" if op.bidirectional else "one-way"))
            elif op.is_collective:
                src, dst = types[op.operands[0]], op.type
                dims = getattr(op, "dim", "") or "".join(x for x in (getattr(op, "concat_dim", ""),
                                                                       getattr(op, "split_dim", "")) if x)
                parts = [*folded.pop(op.result, []), (op.axes, dims)]
                if op.result in chained:  # priced with the gather it feeds
                    folded[chained[op.result]] = parts
                    continue
                axes = tuple(a for ax, _ in parts for a in ax)
                out.append(LedgerEntry(fn.name, op.result, op.kind, axes, "".join(d for _, d in parts),
                                       math.prod(mesh[a] for a in axes),
                                       collective_bytes(op.kind, src, dst, mesh), reps.get(fn.name, 1),
                                       getattr(op, "reason", ""), tuple(ax for ax, _ in parts)))
            elif op.kind == "norm" and types[op.operands[0]].dim(op.dim).axes:
                x = types[op.operands[0]]
                axes = x.dim(op.dim).axes
                stats = 2 if op.norm == "layernorm" else 1
                rows = math.prod(s for s, d in zip(x.local_shape(mesh), x.dims) if d.name != op.dim)
                out.append(LedgerEntry(fn.name, op.result, "all_reduce", axes, op.dim,
                                       math.prod(mesh[a] for a in axes), 2 * stats * rows * DTYPE_BYTES[x.dtype],
                                       reps.get(fn.name, 1), f"norm over sharded {op.dim}: statistics"))
    return out


class _Ctx:
    def __init__(self, mesh: dict[str, int]):
        self.mesh = mesh

    def function(self, name: str):
        raise KeyError(name)


def format_ledger(entries: list[LedgerEntry]) -> list[str]:
    if not entries:
        return ["collective ledger: no collectives"]
    lines = ["collective ledger (bytes per device, paper accounting):"]
    for e in entries:
        rep = f" x{e.repeats}" if e.repeats != 1 else ""
        rep += f" looped {e.looped}" if e.looped else ""
        lines.append(f"  @{e.function} %{e.value}: {e.kind}{{{','.join(e.axes)}}} on {e.dims or '-'} "
                     f"[{e.participants} devices] {e.bytes_per_device} B{rep} - {e.reason}")
    total = sum(e.per_step for e in entries)
    lines.append(f"  total per step: {total} B per device")
    return lines
