"""Mixture-of-experts layouts priced: which mesh axes shard the experts (``serve.expert_axes``).

For a fixed FFN x attention layout, every choice of expert axes (each subset of the mesh axes,
in mesh order, whose devices divide the experts, and ``none``: every expert sliced over every
device) is compiled through the default pipeline and priced like any candidate, so ``auto``
keeps the fastest that fits and no rule for it is written down. Each row also reads off the
compiled program what MoE adds: the expert weights one device holds, the all-to-all pair that
takes tokens to their experts and back (bytes per device per step, from the ledger), and the
dropless dispatch buffer: ``[X, C, E]`` with C = the group's tokens, X/k times the k·tokens rows
actually routed, so the experts' einsums and the all-to-alls carry that padding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import lru_cache

from compiler.cost.autolayout import Candidate, evaluate
from compiler.cost.hardware import Chip, get_chip
from compiler.spec import Spec
from ir.module import Module
from passes.ledger import ledger


@dataclass(frozen=True)
class ExpertRow:
    """One choice of expert axes, priced."""

    axes: str  # "x+y" (the spec spelling), or "none"
    candidate: Candidate
    expert_weight_bytes: int = 0  # per device: the routed experts' weights it holds
    a2a_bytes: int = 0  # per device per step: the all-to-alls to and from the experts
    buffer_bytes: int = 0  # per device per layer: the dispatch buffer [X, C, E] (local block)
    routed_bytes: int = 0  # per device per layer: the k·tokens·E rows that buffer carries

    @property
    def padding(self) -> float:
        """Dispatch buffer over routed rows: X/k for dropless dispatch (1.0 with one expert per token)."""
        return self.buffer_bytes / self.routed_bytes if self.routed_bytes else 0.0


def expert_axes_choices(spec: Spec) -> list[str]:
    """``none`` and every subset of the mesh axes (mesh order) whose devices divide the experts."""
    mesh = spec.mesh.axes
    out = ["none"]
    for r in range(1, len(mesh) + 1):
        for combo in itertools.combinations(mesh, r):
            if spec.model.experts % math.prod(s for _, s in combo) == 0:
                out.append("+".join(a for a, _ in combo))
    return out


def moe_figures(module: Module) -> dict[str, int]:
    """What MoE costs in a compiled module, per device (see :class:`ExpertRow`)."""
    mesh = module.mesh_sizes
    weights = 0
    for p in (p for f in module.entries[:1] for p in f.params_with_role("weight")):
        if p.type.has("X") and p.type.has("F"):
            weights += p.type.local_nbytes(mesh)
    a2a = sum(e.bytes_per_device * e.repeats for e in ledger(module) if e.kind == "all_to_all"
              and ("we_gate" in e.reason or e.reason.startswith("combine")))
    buf = routed = 0
    for f in module.functions:
        for op in f.ops:
            if op.kind == "dispatch" and not buf:
                t = op.types[0]
                buf = t.local_nbytes(mesh)
                routed = buf * op.types[1].size("R") // t.size("X")
    return {"expert_weight_bytes": weights, "a2a_bytes": a2a, "buffer_bytes": buf, "routed_bytes": routed}


@lru_cache(maxsize=32)
def expert_rows(spec: Spec, chip: Chip, model: str = "calibrated") -> tuple[ExpertRow, ...]:
    """Every expert-axes choice for the spec's (resolved) ffn and attn, fastest first."""
    rows = []
    for axes in expert_axes_choices(spec):
        s = replace(spec, serve=replace(spec.serve, expert_axes=axes))
        choice = evaluate(s, chip, (s.serve.ffn,), (s.serve.attn,), keep_modules=True, model=model)
        c = choice.candidates[0]
        figs = moe_figures(c.module) if c.module is not None else {}
        rows.append(ExpertRow(axes, replace(c, module=None), **figs))
    legal = sorted((r for r in rows if r.candidate.legal), key=lambda r: r.candidate.key())
    return tuple(legal + [r for r in rows if not r.candidate.legal])


def resolve_expert_axes(spec: Spec, chip: Chip | None = None) -> Spec:
    """``expert_axes = auto`` on a mesh: the fastest fitting choice of :func:`expert_rows` (the
    ffn and attn must be decided first)."""
    if not spec.model.moe or spec.serve.expert_axes != "auto" or spec.mesh.n_devices == 1:
        return spec
    rows = expert_rows(spec, chip or get_chip(spec.serve.hardware))
    fitting = [r for r in rows if r.candidate.legal and r.candidate.fits]
    legal = fitting or [r for r in rows if r.candidate.legal]
    return replace(spec, serve=replace(spec.serve, expert_axes=legal[0].axes)) if legal else spec


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g}"


def format_expert_rows(rows: tuple[ExpertRow, ...], chosen: str) -> list[str]:
    """The ``explain`` table of expert layouts (``*``: the one in force)."""
    if not rows:
        return []
    head = (f"  {'':1} {'experts':10}{'step ms':>10}{'comm ms':>10}{'expert MiB/dev':>16}{'a2a MiB/step':>14}"
            f"{'buffer/routed':>15}  fits")
    lines = ["  expert layouts (serve.expert_axes; the other axes slice each expert's d_ff):", head,
             "  " + "-" * (len(head) - 2)]
    for r in rows:
        mark = "*" if r.axes == chosen else " "
        c = r.candidate
        if not c.legal:
            lines.append(f"  {mark} {r.axes:10}illegal: {c.illegal}")
            continue
        e = c.est
        lines.append(f"  {mark} {r.axes:10}{e.step_time_s * 1e3:>10.4g}{e.per_step.comm_exposed * 1e3:>10.4g}"
                     f"{_mib(r.expert_weight_bytes):>16}{_mib(r.a2a_bytes):>14}{r.padding:>14.2f}x  "
                     f"{'yes' if e.fits else 'no'}")
    lines.append("  buffer/routed: the dropless dispatch buffer [X, C, E] over the k x tokens rows routed (X/k); "
                 "the experts' einsums and the all-to-alls carry it")
    return lines


def rows_json(rows: tuple[ExpertRow, ...], chosen: str) -> list[dict]:
    return [{"expert_axes": r.axes, "chosen": r.axes == chosen, "legal": r.candidate.legal,
             "illegal": r.candidate.illegal or None,
             "step_s": r.candidate.est.step_time_s if r.candidate.legal else None,
             "fits": r.candidate.fits if r.candidate.legal else False,
             "expert_weight_bytes_per_device": r.expert_weight_bytes, "all_to_all_bytes_per_step": r.a2a_bytes,
             "dispatch_buffer_bytes": r.buffer_bytes, "routed_bytes": r.routed_bytes,
             "dropless_padding": r.padding} for r in rows]
