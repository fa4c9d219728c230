"""``fuse-parallel-block``: the parallel attention + FFN block's projections as fused einsums.

In a parallel block (y = x + Attn(LN(x)) + MLP(LN(x)), reference §7) one normed activation
feeds every input projection, and the attention and FFN outputs are summed. The pass rewrites
each layer body so that

* the FFN input projections and the query (and, with multihead or grouped heads, the key and
  value) projections are **one** einsum over a packed weight ``[E, P]``, whose result is split
  back into its segments;
* multiquery keys and values (no head dim, so not sharded like the rest) share a second packed
  weight;
* the attention output and FFN output projections are one einsum over the packed activations
  ``concat(flatten(attn), hidden)`` and a packed weight ``[P, E]``: one partial sum, reduced once.

The packed weights are built once at load time by a ``@prepare`` function (flatten + concat,
interleaved in ``groups`` chunks so that any sharding of P that divides ``groups`` keeps every
device's share of every segment local; see ir/fusion_ops.py). The entries take the packed
weights; the outputs equal the unfused program's. Run it before ``shard`` (it fuses the logical
program; sharding then sees one weight per fused group) and before ``quantize-int8`` (which
then scales each segment of a packed contraction separately).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ir.builder import FunctionBuilder
from ir.errors import PassError
from ir.graph import readers
from ir.module import PREPARE, Function, Module, ModuleContext, Param
from ir.retype import ScanSite, rewrite_entries
from ir.ops import Binary, Einsum, Op, Scan
from ir.fusion_ops import Concat, Flatten, Split, Unflatten
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.registry import register
from passes.rewrite import rename_uses

HEAD_LETTERS = frozenset("HK")


@dataclass(frozen=True)
class Segment:
    """One weight of a fused group: its name, the letters it contributes and their sizes."""

    weight: str
    letters: str  # the weight's dims other than E (input side) / output E (output side)
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    @property
    def packed_letter(self) -> str:
        """The letter the segment has inside the packed dim: its own when single, else P."""
        return self.letters if len(self.letters) == 1 else "P"


@dataclass(frozen=True)
class Group:
    """A packed weight: its name, segments, and whether E leads (input) or trails (output)."""

    name: str
    segments: tuple[Segment, ...]
    side: str  # "in" or "out"

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass
class _Plan:
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _in_projections(fn: Function, weights: set[str]) -> dict[str, list[Op]]:
    """Einsums ``act[..E], w[E rest] -> [.. rest]`` grouped by their activation."""
    by_act: dict[str, list[Op]] = {}
    types = fn.value_types
    for op in fn.ops:
        if not isinstance(op, Einsum) or len(op.operands) != 2:
            continue
        act, w = op.operands
        if w not in weights or act in weights:
            continue
        (sa, sw), out = op.terms
        if not sw.startswith("E") or "E" not in sa or out != sa.replace("E", "") + sw[1:]:
            continue
        if types[w].names != sw:
            continue
        by_act.setdefault(act, []).append(op)
    return by_act


def _segment(op: Op, types: dict[str, TensorType]) -> Segment:
    w = types[op.operands[1]]
    letters = w.names[1:]
    return Segment(op.operands[1], letters, tuple(w.size(c) for c in letters))


def _bias_chain(v: str, producers: dict[str, Op], uses: dict[str, list[Op]], weights: set[str]):
    """``v`` = einsum (+ bias adds of weights): (the einsum, [bias ops]) or None."""
    biases: list[Op] = []
    while True:
        op = producers.get(v)
        if op is None:
            return None
        if isinstance(op, Einsum):
            return op, biases[::-1]
        if isinstance(op, Binary) and op.fn == "add" and op.operands[1] in weights:
            if len(uses.get(op.operands[0], [])) != 1:
                return None
            biases.append(op)
            v = op.operands[0]
            continue
        return None


def _out_projection(fn: Function, weights: set[str]):
    """``y = add(einsum(a, wo) (+bo), einsum(m, w_down) (+b))`` with both einsums contracting
    everything but E into ``[.., E]``: (add op, (einsum, biases), (einsum, biases))."""
    producers = {r: op for op in fn.ops for r in op.results}
    uses = readers(fn)
    types = fn.value_types
    for op in fn.ops:
        if not (isinstance(op, Binary) and op.fn == "add"):
            continue
        chains = [_bias_chain(v, producers, uses, weights) for v in op.operands]
        if any(c is None for c in chains):
            continue
        ok = True
        for e, _ in chains:
            act, w = e.operands
            (sa, sw), out = e.terms
            if w not in weights or not sw.endswith("E") or out != sa.replace(sw[:-1], "") + "E" \
                    or not all(c in sa for c in sw[:-1]) or len(uses.get(e.result, [])) != 1:
                ok = False
            elif types[w].names != sw or sa[: len(sa) - len(sw) + 1] != out[:-1]:
                ok = False  # the contracted letters must trail the activation's dims
        if ok and chains[0][0].terms[1] == chains[1][0].terms[1]:
            return op, chains[0], chains[1]
    return None


def plan_body(fn: Function, weights: set[str], groups: int, attention: bool) -> _Plan:
    plan = _Plan()
    types = fn.value_types
    by_act = _in_projections(fn, weights)
    if by_act:
        act, ops = max(by_act.items(), key=lambda kv: len(kv[1]))
        segs = [_segment(op, types) for op in ops]
        wide = [s for s in segs if s.letters[0] in HEAD_LETTERS | {"F"}]
        if not attention:
            wide = [s for s in wide if s.letters[0] not in HEAD_LETTERS]
        narrow = [s for s in segs if s.letters == "D"] if attention else []
        for name, members in (("w_in_fused", wide), ("w_kv_fused", narrow)):
            bad = [s.weight for s in members if s.size % groups]
            if bad:
                plan.notes.append(f"{name}: not fused, {', '.join(bad)} do not split into {groups} groups")
            elif len(members) >= 2:
                plan.groups.append(Group(name, tuple(members), "in"))
    out = _out_projection(fn, weights)
    if out is not None:
        _, (ea, _), (em, _) = out
        segs = []
        for e in (ea, em):
            w = types[e.operands[1]]
            letters = w.names[:-1]
            segs.append(Segment(e.operands[1], letters, tuple(w.size(c) for c in letters)))
        bad = [s.weight for s in segs if s.size % groups]
        if bad:
            plan.notes.append(f"w_out_fused: not fused, {', '.join(bad)} do not split into {groups} groups")
        else:
            plan.groups.append(Group("w_out_fused", tuple(segs), "out"))
    else:
        plan.notes.append("output projections: no add of two projections found (serial block?)")
    return plan


def _pack(em: FunctionBuilder, g: Group, names: dict[str, str], types: dict[str, TensorType], groups: int) -> str:
    """Emits flatten + concat of the group's weights (stacked or not); returns the packed value."""
    parts, letters = [], ""
    for s in g.segments:
        v = names[s.weight]
        if len(s.letters) > 1:
            v = em.emit(Flatten, [v], s.weight, dims=s.letters, into="P")
        parts.append(v)
        letters += s.packed_letter
    packed = em.emit(Concat, parts, g.name, dims=letters, into="P", groups=groups)
    return packed


def _emit_input_group(em: FunctionBuilder, fn: Function, g: Group, act: str, fused: str, body_name: dict[str, str],
                      groups: int, mapping: dict[str, str]) -> None:
    """One einsum of ``act`` with the fused input weight, split back into the segments' results
    (``mapping``: each original einsum's result -> its segment)."""
    sa = em.types[act].names
    y = em.emit(Einsum, [act, fused], g.name.replace("w_", "").replace("_fused", ""),
                   spec=f"{sa},EP->{sa.replace('E', '')}P")
    # the original einsum of each segment: its result now comes from the split
    origs = [next(o for o in fn.ops if isinstance(o, Einsum) and len(o.operands) == 2
                  and o.operands[1] == body_name[s.weight] and o.operands[0] == act)
             for s in g.segments]
    segs = em.emit(Split, [y], [o.result for o in origs], dim="P",
                   names="".join(s.packed_letter for s in g.segments),
                   sizes=tuple(s.size for s in g.segments), groups=groups)
    for s, v, orig in zip(g.segments, segs, origs):
        if len(s.letters) > 1:
            v = em.emit(Unflatten, [v], orig.result, dim="P", into=s.letters, sizes=s.sizes)
        mapping[orig.result] = v


def _emit_output_group(em: FunctionBuilder, out_match, g: Group, fused: str, groups: int,
                       mapping: dict[str, str]) -> set[str]:
    """The output projections' activations packed into one einsum with the fused output weight
    (then their bias adds); returns the results it replaces."""
    add, (ea, ba), (em_, bm) = out_match
    acts, letters = [], ""
    for e, s in zip((ea, em_), g.segments):
        a = mapping.get(e.operands[0], e.operands[0])
        if len(s.letters) > 1:
            a = em.emit(Flatten, [a], e.operands[0], dims=s.letters, into="P")
        acts.append(a)
        letters += s.packed_letter
    cat = em.emit(Concat, acts, "packed", dims=letters, into="P", groups=groups)
    sa = em.types[cat].names
    y = em.emit(Einsum, [cat, fused], "out", spec=f"{sa},PE->{sa.replace('P', '')}E")
    for b in ba + bm:
        y = em.emit(Binary, [y, b.operands[1]], "out", fn="add")
    mapping[add.result] = y
    return {r for x in (ea, em_, *ba, *bm) for r in x.results}


def rewrite_body(fn: Function, plan: _Plan, weight_of: dict[str, str], ctx, groups: int) -> Function:
    """``weight_of``: body param -> the entry weight it receives (segment names are entry names)."""
    body_name = {v: k for k, v in weight_of.items()}
    types = fn.value_types
    em = FunctionBuilder.over(fn, ctx)
    fused_param: dict[str, str] = {}
    for g in plan.groups:
        fused_param[g.name] = em.namer.fresh(g.name)
        w = types[body_name[g.segments[0].weight]]
        p = Dim("P", g.size)
        em.types[fused_param[g.name]] = TensorType(w.dtype, (w.dim("E"), p) if g.side == "in" else (p, w.dim("E")))
    ins = {g.name: g for g in plan.groups if g.side == "in"}
    member = {body_name[s.weight]: g.name for g in ins.values() for s in g.segments}
    out_g = next((g for g in plan.groups if g.side == "out"), None)
    out_match = _out_projection(fn, set(weight_of)) if out_g else None
    done: set[str] = set()
    mapping: dict[str, str] = {}
    drop: set[str] = set()
    new_ops: list[Op] = []
    for i, op in enumerate(fn.ops):
        op = op.with_(operands=tuple(mapping.get(o, o) for o in op.operands))
        if isinstance(op, Einsum) and len(op.operands) == 2 and op.operands[1] in member:
            gname = member[op.operands[1]]
            if gname not in done:
                done.add(gname)
                em.ops = []
                _emit_input_group(em, fn, ins[gname], op.operands[0], fused_param[gname], body_name, groups, mapping)
                new_ops += em.ops
            continue
        if out_match is not None and op.results == out_match[0].results:
            assert out_g is not None  # out_match is only found for the output group
            em.ops = []
            drop |= _emit_output_group(em, out_match, out_g, fused_param[out_g.name], groups, mapping)
            new_ops += em.ops
            continue
        new_ops.append(op)
    # the replaced einsums and bias adds are now dead; drop them (and their removed weights)
    removed_w = {body_name[s.weight] for g in plan.groups for s in g.segments}
    kept = [op for op in new_ops if not (set(op.results) & drop)
            and not (isinstance(op, Einsum) and set(op.operands) & removed_w)]
    params: list[Param] = []
    placed = set()
    for prm in fn.params:  # each fused weight where its first segment was
        if prm.name in removed_w:
            fused = member.get(prm.name) or (out_g.name if out_g else "")
            if fused and fused not in placed:
                placed.add(fused)
                params.append(Param(fused_param[fused], em.types[fused_param[fused]], prm.role))
            continue
        params.append(prm)
    out = rename_uses(fn.with_ops(kept), mapping)
    return Function(fn.name, tuple(params), out.ops, out.returns,
                    tuple(em.types.get(r) or fn.value_types[r] for r in out.returns), fn.entry)


def _weights_received(entry: Function, sc: Scan, body: Function) -> dict[str, str]:
    """The layer body's weight params and the stacked entry weights they receive."""
    start = sc.carry + sc.consts
    roles = {p.name: p.role for p in entry.params}
    return {bp.name: v for bp, v in zip(body.params[start:], sc.operands[start:]) if roles.get(v) == "weight"}


def _fused_entry(entry: Function, ctx: ModuleContext, body_plans: dict[str, tuple[_Plan, dict[str, str]]]) -> Function:
    """``entry`` taking each packed weight (stacked along N) in place of its segments, in the
    place of the first of them, and handing it to the rewritten layer body."""
    ops = list(entry.ops)
    params = list(entry.params)
    for i, sc in enumerate(ops):
        if not isinstance(sc, Scan) or sc.body.name not in body_plans:
            continue
        plan, _ = body_plans[sc.body.name]
        start = sc.carry + sc.consts
        e_types = entry.value_types
        removed = {s.weight: g for g in plan.groups for s in g.segments}
        b_types = {p.name: p.type for p in ctx.function(sc.body.name).params}
        packed = {g.name: TensorType(b_types[g.name].dtype, (e_types[g.segments[0].weight].dim("N"),
                                                              *b_types[g.name].dims)) for g in plan.groups}
        operands = list(sc.operands[:start])
        for v in sc.operands[start:]:
            g = removed.get(v)
            if g is None:
                operands.append(v)
            elif g.name not in operands:
                operands.append(g.name)
        new_params: list[Param] = []
        for p in params:
            g = removed.get(p.name)
            if g is None:
                new_params.append(p)
            elif g.name not in {q.name for q in new_params}:
                new_params.append(Param(g.name, packed[g.name], "weight"))
        params = new_params
        ops[i] = sc.with_(operands=tuple(operands))
    return Function(entry.name, tuple(params), tuple(ops), entry.returns, entry.result_types, True)


@register
@dataclass(frozen=True)
class FuseParallelBlock(Pass):
    """Fuses the parallel block's projections into packed einsums built by a @prepare function."""

    name = "fuse-parallel-block"
    summary = "one packed einsum for the input projections and one for the output projections"
    runs_after = ("pad-heads", "pad-dims")

    #: Interleave groups of the packed dims; 0 = the mesh's device count (any sharding divides it).
    groups: int = 0
    #: Also pack the attention projections (q, and k/v with heads) with the FFN input.
    attention: bool = True

    def __post_init__(self) -> None:
        if self.groups < 0:
            raise PassError(f"fuse-parallel-block: groups must be >= 0, got {self.groups}")

    def run(self, module: Module) -> PassResult:
        if module.prepare is not None:
            raise PassError("fuse-parallel-block: the module already has a @prepare function; "
                            "run fuse-parallel-block before quantize-int8")
        if any(d.axes or t.partial for f in module.functions for t in f.value_types.values() for d in t.dims):
            raise PassError("fuse-parallel-block: the module is already sharded; run it before shard")
        groups = self.groups or module.n_devices
        plans: dict[str, tuple[Group, ...]] = {}
        notes: list[str] = []
        body_plans: dict[str, tuple[_Plan, dict[str, str]]] = {}
        for entry in module.entries:
            for sc in [op for op in entry.ops if isinstance(op, Scan)]:
                body = module.function(sc.body.name)
                weight_of = _weights_received(entry, sc, body)
                plan = plan_body(body, set(weight_of), groups, self.attention)
                # name segments by the entry weights (shared by all entries)
                plan.groups = [Group(g.name, tuple(Segment(weight_of[s.weight], s.letters, s.sizes)
                                                   for s in g.segments), g.side) for g in plan.groups]
                notes += [f"@{body.name}: {n}" for n in plan.notes]
                key = tuple(plan.groups)
                if plans and key not in plans.values():
                    raise PassError(f"fuse-parallel-block: @{body.name} fuses differently from another layer body")
                plans[body.name] = key
                if plan.groups:
                    body_plans[body.name] = (plan, weight_of)
        if not body_plans:
            return PassResult(module, {"parallel blocks fused": 0}, tuple(notes))

        def body_rewrite(fn: Function, site: ScanSite, ctx: ModuleContext) -> Function:
            if fn.name not in body_plans:
                return fn
            plan, weight_of = body_plans[fn.name]
            return rewrite_body(fn, plan, weight_of, ctx, groups)

        fns = rewrite_entries(module, body_rewrite,
                              lambda entry, ctx: _fused_entry(entry, ctx, body_plans))
        new_entries = {e.name: fns[e.name] for e in module.entries}
        fused = next(iter(plans.values()))
        first = module.entries[0]
        prep = self._prepare(first, new_entries[first.name], fused, module, groups)
        out = module.with_functions([prep, *[fns[f.name] for f in module.functions]])
        stats = {"parallel blocks fused": len(plans),
                 "projections packed per layer": sum(len(g.segments) for g in fused),
                 "einsums per layer saved": sum(len(g.segments) - 1 for g in fused)}
        for g in fused:
            packed = f"P={g.size}"
            notes.append(f"{g.name} [{'E, ' + packed if g.side == 'in' else packed + ', E'}] packs "
                         + " + ".join(f"{s.weight}({s.letters})" for s in g.segments)
                         + f", interleaved in {groups} groups")
        return PassResult(out, stats, tuple(notes))

    @staticmethod
    def _prepare(raw: Function, new: Function, fused: tuple[Group, ...], module: Module, groups: int) -> Function:
        params = raw.params_with_role("weight")
        stub = Function(PREPARE, params, (), (), ())
        em = FunctionBuilder.over(stub, ModuleContext(module))
        names = {p.name: p.name for p in params}
        values = {}
        for g in fused:
            values[g.name] = _pack(em, g, names, em.types, groups)
        rets = tuple(values.get(p.name, p.name) for p in new.params_with_role("weight"))
        return Function(PREPARE, params, tuple(em.ops), rets, tuple(em.types[r] for r in rets))
