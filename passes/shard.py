"""``shard``: assigns a layout's shardings at the boundary and propagates them through the IR.

Parameters (weights, caches) and the residual stream get their shardings from the layout
(passes/layouts.py). Every op is then visited in order; a small rule per op kind says which
operand shardings it needs — an einsum keeps its *anchor* still (the cache, else the weight in
weight-stationary layouts, else the activation's batch dims in weight-gathered ones) and
adapts the other operand; nonlinear ops need whole sums; softmax/rope/masks need their dim
whole. Where an operand's layout differs from what its consumer needs, a ``reshard`` op is
inserted with the reason; ``insert-collectives`` turns those into collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from ir.builder import Namer
from ir.collectives import Reshard
from ir.errors import PassError
from ir.module import Function, Module, ModuleContext, Param
from ir.retype import ScanSite, rewrite_entries
from ir.ops import Op, Scan
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.layouts import (ATTN_LAYOUTS, FFN_LAYOUTS, HeadSplit, Layout, cache_axes, default_expert_axes,
                            dividing_prefix, head_split, require_fit, split_for_batch, weight_axes, with_axes)
from passes.registry import register

Axes = dict[str, tuple[str, ...]]

#: Dims a pending partial sum is scattered onto, in order of preference, when its consumer
#: needs a whole sum but does not care how it is sharded.
SCATTER_PRIORITY = "PFHKGVEBDTL"


def axes_of(t: TensorType) -> Axes:
    return {d.name: d.axes for d in t.dims}


def cut(axes: tuple[str, ...], used: set[str]) -> tuple[str, ...]:
    """Drops the first axis in ``used`` and every axis after it (gathers take suffixes)."""
    for i, a in enumerate(axes):
        if a in used:
            return axes[:i]
    return axes


def retype(t: TensorType, axes: Axes, partial: frozenset[str] = frozenset()) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, d.size, axes.get(d.name, ())) for d in t.dims), partial)


def common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for x, y in zip(a, b):
        if x != y:
            break
        out.append(x)
    return tuple(out)


def settle(t: TensorType, mesh: dict[str, int], forbid: str = "",
           prefer: dict[str, tuple[str, ...]] | None = None) -> TensorType:
    """``t`` with its partial sums resolved: onto a dim's preferred sharding when it holds the
    partial axes and its other axes are free (a local slice then a reduce-scatter), else
    reduce-scattered onto the first dim (in SCATTER_PRIORITY order) that divides, else
    all-reduced."""
    if not t.partial:
        return t
    order = [a for a in mesh if a in t.partial]
    extra = math.prod(mesh[a] for a in order)
    ax = axes_of(t)
    used = {a for v in ax.values() for a in v}
    for c, want in (prefer or {}).items():
        if t.has(c):
            want = dividing_prefix(t.size(c), want, mesh)
        if c in forbid or not t.has(c) or not want or not t.partial <= set(want):
            continue
        cur = ax[c]
        free = set(want[len(cur):]) - t.partial
        if want[: len(cur)] == cur and not (free & used) and t.size(c) % math.prod(mesh[a] for a in want) == 0:
            ax[c] = want
            return retype(t, ax)
    for c in SCATTER_PRIORITY:
        if c in forbid or not t.has(c):
            continue
        cur = ax[c]
        if t.size(c) % (math.prod(mesh[a] for a in cur) * extra) == 0:
            ax[c] = cur + tuple(order)
            return retype(t, ax)
    return retype(t, ax)


#: Roles that flow through ops: an updated cache is still the cache.
RESULT_ROLES: dict[str, Callable[["Propagation", list[str]], str]] = {
    "cache_update": lambda p, ops: "cache",
    "dequantize": lambda p, ops: "weight",  # an int8 weight, dequantized, is still the weight
}


@dataclass
class Propagation:
    """Rebuilds one function with new param types, inserting reshards where rules demand."""

    layout: Layout
    ctx: ModuleContext
    fn: Function
    roles: dict[str, str]
    types: dict[str, TensorType]
    body_sigs: dict[str, tuple[tuple[TensorType, ...], tuple[TensorType, ...]]]
    ops: list[Op] = field(default_factory=list)
    reshards: int = 0
    memo: dict[tuple[str, TensorType], str] = field(default_factory=dict)
    #: Values produced by a dequantize, so that reshards of them move the int8 operands instead.
    dequantized: dict[str, Op] = field(default_factory=dict)

    def __post_init__(self) -> None:
        taken = {p.name for p in self.fn.params} | {r for op in self.fn.ops for r in op.results}
        self.namer = Namer(taken)

    @property
    def mesh(self) -> dict[str, int]:
        return self.ctx.mesh

    def role(self, v: str) -> str:
        return self.roles.get(v, "act")

    def to(self, v: str, target: TensorType, reason: str) -> str:
        cur = self.types[v]
        if cur == target:
            return v
        key = (v, target)
        if key in self.memo:
            return self.memo[key]
        if v in self.dequantized and not target.partial:
            # move the int8 weight and its scales, not the dequantized floats: a quarter (or half)
            # of the bytes; the dequantize is re-emitted after the move
            op = self.dequantized[v]
            q, s = op.operands
            q2 = self.to(q, target.with_dtype("i8"), reason)
            ts = self.types[s]
            s2 = self.to(s, retype(ts, {d.name: (target.dim(d.name).axes if d.name != "S" else ())
                                        for d in ts.dims}), reason)
            name = self.namer.fresh(v)
            self.emit(op.with_(results=(name,), operands=(q2, s2), types=()), [q2, s2])
            self.memo[key] = name
            return name
        name = self.namer.fresh(v)
        self.ops.append(Reshard(results=(name,), operands=(v,), types=(target,), reason=reason))
        self.types[name] = target
        self.roles[name] = self.role(v)
        self.memo[key] = name
        self.reshards += 1
        return name

    def whole(self, v: str, reason: str, forbid: str = "", need_whole: str = "") -> str:
        """No partial sums, and the dims in ``need_whole`` unsharded."""
        t = settle(self.types[v], self.mesh, forbid + need_whole, self.layout.prefer())
        if need_whole:
            ax = axes_of(t)
            for c in need_whole:
                if c in ax:
                    ax[c] = ()
            t = retype(t, ax, t.partial)
        return self.to(v, t, reason)

    def emit(self, op: Op, operands: list[str]) -> None:
        ins = tuple(self.types[o] for o in operands)
        probe = op.with_(operands=tuple(operands), types=())
        try:
            types = probe.infer(ins, self.ctx)
        except Exception as e:  # a rule that does not cover a case is a compiler bug, with context
            raise PassError(f"shard: cannot type {op.kind} {op.results} after resharding: {e}") from e
        new = op.with_(operands=tuple(operands), types=types)
        self.ops.append(new)
        if new.kind == "dequantize":
            self.dequantized[new.result] = new
        for r, t in zip(new.results, types):
            self.types[r] = t
            self.roles[r] = RESULT_ROLES.get(op.kind, lambda p, o: "act")(self, operands)


# ---- per-op rules ---------------------------------------------------------------------------


def _einsum(p: Propagation, op) -> list[str]:
    if len(op.operands) != 2:
        return [p.whole(o, f"einsum {op.spec}") for o in op.operands]
    a, b = op.operands
    ta, tb = p.types[a], p.types[b]
    (sa, sb), out = op.terms
    contracted = set(sa + sb) - set(out)
    ra, rb = p.role(a), p.role(b)
    if "cache" in (ra, rb):
        anchor_v = a if ra == "cache" else b
        anchor = axes_of(p.types[anchor_v])
        why = f"einsum {op.spec}: operand must match the KV cache layout"
    elif "weight" in (ra, rb):
        w, act = (a, b) if ra == "weight" else (b, a)
        wname = p.dequantized[w].operands[0] if w in p.dequantized else w  # name the int8 weight
        if p.layout.weights_move and not _output_head(p.types[w], contracted) and not p.types[w].has("X"):
            anchor = {d: ax for d, ax in axes_of(p.types[act]).items() if d not in contracted}
            why = f"einsum {op.spec}: weight-gathered, weight {wname} gathered to the activation's batch layout"
        else:
            anchor = axes_of(p.types[w])
            why = f"einsum {op.spec}: weight-stationary, activation must match weight {wname}"
    else:
        anchor = axes_of(ta)
        why = f"einsum {op.spec}: operands must agree"
    used = {x for ax in anchor.values() for x in ax}
    tgt: list[Axes] = []
    for t in (ta, tb):
        tgt.append({d.name: anchor[d.name] if d.name in anchor else cut(d.axes, used) for d in t.dims})
    for d in set(sa) & set(sb):
        if d not in anchor:
            common = common_prefix(tgt[0][d], tgt[1][d])
            tgt[0][d] = tgt[1][d] = common
    # no mesh axis may shard two dims of the einsum
    seen: set[str] = set(used)
    for d in list(dict.fromkeys(sa + sb)):
        if d in anchor:
            continue
        ax = tgt[0].get(d, tgt[1].get(d, ()))
        new = cut(ax, seen)
        for tg in tgt:
            if d in tg:
                tg[d] = new
        seen |= set(new)
    return [p.to(v, retype(t, tg), why) for v, t, tg in ((a, ta, tgt[0]), (b, tb, tgt[1]))]


def _output_head(w: TensorType, contracted: set[str]) -> bool:
    """The vocab-parallel output head stays still even in weight-gathered layouts: gathering the
    whole [V, E] table to every chip would hold V x E per chip and repeat the logits einsum on
    every replica of the batch; the [B, L, E] activation moves instead (far smaller)."""
    return w.has("V") and "V" not in contracted and any(d.axes for d in w.dims)


def _binary(p: Propagation, op) -> list[str]:
    a, b = op.operands
    ta, tb = p.types[a], p.types[b]
    reason = f"binary {op.fn}: operand layouts must agree"
    linear_ok = (op.fn in ("add", "sub") and ta.partial == tb.partial) or (
        op.fn == "mul" and not (ta.partial & tb.mesh_axes) and not (tb.partial & ta.mesh_axes)) or (
        op.fn == "div" and not tb.partial and not (ta.partial & tb.mesh_axes))
    if p.role(a) == "weight" or p.role(b) == "weight":
        w, x = (a, b) if p.role(a) == "weight" else (b, a)
        if not linear_ok:
            x = p.whole(x, f"binary {op.fn} with weight {w}: needs a whole sum")
        tx = p.types[x]
        tw = retype(p.types[w], {d: tx.dim(d).axes for d in p.types[w].names if tx.has(d)})
        w = p.to(w, tw, f"binary {op.fn}: weight {w} sliced to the activation's layout")
        return [w, x] if p.role(a) == "weight" else [x, w]
    if not linear_ok:
        # reduce the partial operand(s) toward the other one's layout when it is whole
        if ta.partial and not tb.partial:
            a = p.to(a, retype(ta, _aligned(ta, tb)), reason)
        elif tb.partial and not ta.partial:
            b = p.to(b, retype(tb, _aligned(tb, ta)), reason)
        else:
            a, b = p.whole(a, reason), p.whole(b, reason)
        ta, tb = p.types[a], p.types[b]
    if ta.partial != tb.partial and op.fn in ("add", "sub"):
        a, b = p.whole(a, reason), p.whole(b, reason)
        ta, tb = p.types[a], p.types[b]
    # align shared dims on the operand with more dims (the residual / activation)
    base, other = (ta, tb) if ta.rank >= tb.rank else (tb, ta)
    aligned = retype(other, _aligned(other, base), other.partial)
    if other is tb:
        b = p.to(b, aligned, reason)
    else:
        a = p.to(a, aligned, reason)
    return [a, b]


def _aligned(t: TensorType, ref: TensorType) -> Axes:
    """``t``'s dims on ``ref``'s axes where shared; its own dims keep axes that do not clash."""
    used = {x for d in ref.dims for x in d.axes}
    return {d.name: ref.dim(d.name).axes if ref.has(d.name) else cut(d.axes, used) for d in t.dims}


def _nonlinear(p: Propagation, op) -> list[str]:
    return [p.whole(op.operands[0], f"{op.kind} {getattr(op, 'fn', '')}".strip() + ": nonlinear, needs whole sums")]


def _linear(p: Propagation, op) -> list[str]:
    return list(op.operands)


def _norm(p: Propagation, op) -> list[str]:
    x = p.whole(op.operands[0], "norm: needs whole sums")
    tx = p.types[x]
    params = [p.to(w, retype(p.types[w], {op.dim: tx.dim(op.dim).axes}), f"norm: {w} sliced like its input")
              for w in op.operands[1:]]
    return [x, *params]


def _softmax(p: Propagation, op) -> list[str]:
    return [p.whole(op.operands[0], f"softmax over {op.dim}: needs the dim whole", need_whole=op.dim)]


def _positions_like(p: Propagation, pos: str, t: TensorType, why: str) -> str:
    return p.to(pos, retype(p.types[pos], {"B": t.dim("B").axes, "L": t.dim("L").axes}), why)


def _rope(p: Propagation, op) -> list[str]:
    x = p.whole(op.operands[0], "rope: rotates D, needs it whole", need_whole="D")
    return [x, _positions_like(p, op.operands[1], p.types[x], "rope: positions sliced like the activation")]


def _mask(p: Propagation, op) -> list[str]:
    s = p.whole(op.operands[0], "causal_mask: needs T whole", need_whole="T")
    return [s, _positions_like(p, op.operands[1], p.types[s], "causal_mask: positions sliced like the scores")]


def _cache_update(p: Propagation, op) -> list[str]:
    cache, new, pos = op.operands
    tc = p.types[cache]
    ax = {d.name: d.axes for d in tc.dims if d.name != "T"}
    new = p.to(new, retype(p.types[new], ax), "cache_update: new keys/values must match the KV cache layout")
    pos = p.to(pos, retype(p.types[pos], {"B": tc.dim("B").axes}), "cache_update: positions sliced like the cache")
    return [cache, new, pos]


def _embed(p: Propagation, op) -> list[str]:
    """A vocab-parallel table gives each device a partial sum of the whole ``[B, L, E]`` output;
    when that is larger than the device's share of the table, the table is moved to an
    E-sharded copy first (one all-to-all) and each device looks up its columns of every row."""
    table, tokens = op.operands
    tt, tk = p.types[table], p.types[tokens]
    axes = tt.dim("V").axes
    if axes and _columns_cheaper(tt, tk, axes, p.mesh):
        table = p.to(table, retype(tt, {"E": axes}),
                     "embed: the vocab-parallel partial [B, L, E] outweighs the table; look up E-sharded columns")
    used = set(p.types[table].mesh_axes)
    tokens = p.to(tokens, retype(tk, {d.name: cut(d.axes, used) for d in tk.dims}), "embed: tokens vs table")
    return [table, tokens]


def _columns_cheaper(table: TensorType, tokens: TensorType, axes: tuple[str, ...], mesh: dict[str, int]) -> bool:
    """Per-device elements moved and held: the partial output ``B·L·E`` (reduce-scattered next)
    against the table's share ``V·E/k`` (all-to-all) plus the E-sharded output ``B·L·E/k``."""
    k = math.prod(mesh[a] for a in axes)
    e = table.size("E")
    if e % k:
        return False
    rows = math.prod(d.size // math.prod(mesh[a] for a in cut(d.axes, set(axes))) for d in tokens.dims)
    return table.size("V") * e // k + rows * e // k < rows * e


def _scan(p: Propagation, op) -> list[str]:
    params, _ = p.body_sigs[op.body.name]
    out = []
    for v, want in zip(op.operands, params):
        t = p.types[v]
        if t.has("N") and not want.has("N"):
            want = TensorType(want.dtype, (t.dim("N"), *want.dims), want.partial)
        out.append(p.to(v, want, f"scan @{op.body.name}: layer boundary layout"))
    return out


def _flatten(p: Propagation, op) -> list[str]:
    x = op.operands[0]
    t = p.types[x]
    ax = axes_of(t)
    for c in op.dims[1:]:
        ax[c] = ()
    return [p.to(x, retype(t, ax, t.partial), f"flatten {op.dims}: only the major dim may stay sharded")]


def _unflatten(p: Propagation, op) -> list[str]:
    """The major dim takes the packed dim's sharding; where it does not divide over all of its
    axes, the longest prefix that divides is kept (a gather over the rest only)."""
    x = op.operands[0]
    t = p.types[x]
    axes = t.dim(op.dim).axes
    keep = dividing_prefix(op.sizes[0], axes, p.mesh)
    if keep != axes:
        ax = axes_of(t)
        ax[op.dim] = keep
        x = p.to(x, retype(t, ax, t.partial),
                 f"unflatten {op.dim}: {op.into[0]}={op.sizes[0]} does not divide over {{{','.join(axes)}}}")
    return [x]


def _concat(p: Propagation, op) -> list[str]:
    """Every operand takes the layout of the largest one (the packed dim included), so the big
    FFN activation stays put and the small attention output moves to it."""
    vs = list(op.operands)
    if len({p.types[v].partial for v in vs}) > 1:
        vs = [p.whole(v, "concat: operands must be the same kind of partial sum") for v in vs]
    ts = [p.types[v] for v in vs]
    i = max(range(len(ts)), key=lambda k: (math.prod(ts[k].shape), -k))
    anchor = axes_of(ts[i])
    packed = anchor[op.dims[i]]
    if op.groups % math.prod(p.mesh[a] for a in packed):
        packed = ()
    out = []
    for v, t, c in zip(vs, ts, op.dims):
        ax = {d: (packed if d == c else anchor.get(d, ())) for d in t.names}
        out.append(p.to(v, retype(t, ax, t.partial), f"concat into {op.into}: operands packed alike"))
    return out


def _split(p: Propagation, op) -> list[str]:
    k = len(op.sizes)
    x = op.operands[0]
    axes = p.types[x].dim(op.dim).axes
    if op.groups % math.prod(p.mesh[a] for a in axes):  # e.g. padded logits sliced back to the true V
        return [p.whole(x, f"split {op.dim}: {op.groups} interleave groups do not divide over "
                           f"{{{','.join(axes)}}}, needs the dim whole", need_whole=op.dim)]
    return [p.whole(x, f"split {op.dim} into {k} segments: one collective for {k} fused projections")]


def _dequantize(p: Propagation, op) -> list[str]:
    q, s = op.operands
    tq, ts = p.types[q], p.types[s]
    ax = {d.name: (tq.dim(d.name).axes if d.name != "S" else ()) for d in ts.dims}
    return [q, p.to(s, retype(ts, ax), "dequantize: scales sliced like the weight")]


def _top_k(p: Propagation, op) -> list[str]:
    return [p.whole(op.operands[0], f"top_k over {op.dim}: needs the dim whole", need_whole=op.dim)]


def _dispatch(p: Propagation, op) -> list[str]:
    """Expert parallelism: each device dispatches the tokens of its batch slice over the expert
    axes (a free local slice of the gathered activation), so the buffer's C is sharded like them
    and the experts' einsums move it to X-sharded with one all-to-all."""
    h, idx = op.operands
    th = p.types[h]
    ea = p.layout.experts
    b = dividing_prefix(th.size("B"), ea, p.mesh)
    # a long prompt spreads over L too, when dropless: a capacity is per sequence, kept whole
    dropless = op.capacity == th.size("B") * th.size("L")
    lay = {"B": b, "L": dividing_prefix(th.size("L"), ea[len(b):], p.mesh) if dropless else ()}
    # the router already gathered the rows: slice that copy (free) rather than move h again
    h = p.memo.get((h, retype(th, {})), h)
    h = p.to(h, retype(th, lay), "dispatch: tokens sliced over the expert axes, rows whole")
    idx = p.to(idx, retype(p.types[idx], lay), "dispatch: routes sliced like their tokens")
    return [h, idx]


def _combine(p: Propagation, op) -> list[str]:
    """The expert outputs go back to their tokens: X whole, C sharded like the tokens. A partial
    sum over the expert-slicing axes is reduce-scattered onto E first, so the all-to-all that
    returns the rows moves a slice of E only."""
    y, idx, slot, w = op.operands
    ts = p.types[slot]  # laid out as its dispatch sliced the tokens
    ty = p.types[y]
    tok = ts.dim("B").axes + ts.dim("L").axes
    e_axes = ty.dim("E").axes
    if ty.partial and tok:  # (replicated tokens: the combine's own partial sum over X joins it instead)
        more = tuple(a for a in p.layout.all_axes if a in ty.partial)
        if ty.size("E") % math.prod(p.mesh[a] for a in e_axes + more) == 0 and not set(more) & set(tok):
            e_axes = e_axes + more
    partial = ty.partial - set(e_axes)
    # tokens replicated over the expert axes: each device combines its own experts (a partial sum)
    x_axes = ty.dim("X").axes if not tok else ()
    y = p.to(y, retype(ty, {"X": x_axes, "C": tok, "E": cut(e_axes, set(tok))}, frozenset(partial)),
             "combine: expert outputs back to their tokens' devices")
    lay = {"B": ts.dim("B").axes, "L": ts.dim("L").axes}
    idx = p.to(idx, retype(p.types[idx], lay), "combine: routes laid out like their dispatch")
    w = p.whole(w, "combine: router weights need whole sums")
    w = p.to(w, retype(p.types[w], lay), "combine: router weights laid out like the routes")
    return [y, idx, slot, w]


RULES: dict[str, Callable[[Propagation, Op], list[str]]] = {
    "top_k": _top_k, "dispatch": _dispatch, "combine": _combine,
    "flatten": _flatten, "unflatten": _unflatten, "concat": _concat, "split": _split,
    "quantize": _linear, "dequantize": _dequantize,
    "einsum": _einsum, "binary": _binary, "unary": lambda p, op: (
        _linear(p, op) if op.fn == "neg" else _nonlinear(p, op)),
    "scale": _linear, "cast": _linear, "norm": _norm, "softmax": _softmax, "rope": _rope,
    "causal_mask": _mask, "cache_update": _cache_update, "embed": _embed, "scan": _scan,
}


# ---- the pass -------------------------------------------------------------------------------


def layout_hint(layout: Layout, t: TensorType, ax: dict[str, tuple[str, ...]]) -> str:
    """What the user can change when ``t`` does not divide as ``ax`` says (each option works)."""
    bad = [d for d, a in ax.items() if a and t.size(d) % math.prod(layout.sizes[x] for x in a)]
    d = bad[0] if bad else ""
    if d == "B":
        return ("choose a batch divisible by the devices it is split over (--batch), or --attn heads, or let "
                "pad-dims pad it (the default pipeline does, unless --no-pad)")
    if d and d in "KG":
        return ("pad the grouped-query heads with zero heads (--set serve.kv=pad; the default kv=auto "
                "pads when no sharding divides)")
    if d == "H":
        return ("pad the heads with pad-heads (the default pipeline does when they do not divide the devices the "
                "layout shards them over)")
    if d in ("E", "F"):
        return (f"choose another layout (--ffn/--attn) or a mesh (--mesh) whose axes divide {d}, or let pad-dims "
                "zero-pad it (the default pipeline does, unless --no-pad)")
    return f"choose another layout (--ffn/--attn) or a mesh (--mesh) whose axes divide {d}"


def param_type(layout: Layout, name: str, role: str, t: TensorType, heads: HeadSplit, kind: str = "") -> TensorType:
    core = t.drop("N") if t.has("N") else t
    if role == "weight":
        ax = weight_axes(layout, name, core, heads, kind)
        what = f"weight %{name}"
    elif role == "cache":
        ax = cache_axes(layout, core, heads)
        what = f"KV cache %{name}"
    else:
        return t
    hint = layout_hint(layout, core, ax)
    require_fit(what, core, ax, layout.sizes, hint)
    return with_axes(t, ax)


def rest_type(layout: Layout, t: TensorType) -> TensorType:
    ax = layout.rest()
    require_fit("the residual stream [B, L, E]", t, ax, layout.sizes,
                "choose a batch divisible by the batch axes, or another --ffn layout, or let pad-dims pad B and "
                "E (the default pipeline does, unless --no-pad)")
    return with_axes(t, ax)


def propagate(layout: Layout, ctx: ModuleContext, fn: Function, new_params: list[Param], roles: dict[str, str],
              body_sigs: dict, return_targets: list[TensorType | None]) -> tuple[Function, int]:
    p = Propagation(layout, ctx, fn, dict(roles), {q.name: q.type for q in new_params}, body_sigs)
    for op in fn.ops:
        rule = RULES.get(op.kind)
        if rule is None:
            raise PassError(f"shard: no sharding rule for op '{op.kind}'")
        p.emit(op, rule(p, op))
    rets = []
    for r, want in zip(fn.returns, return_targets):
        if want is None:
            want = settle(p.types[r], p.mesh, prefer=layout.prefer())
        rets.append(p.to(r, want, f"@{fn.name} result layout"))
    out = Function(fn.name, tuple(new_params), tuple(p.ops), tuple(rets), tuple(p.types[r] for r in rets), fn.entry)
    return out, p.reshards


@register
@dataclass(frozen=True)
class Shard(Pass):
    """Applies an FFN and an attention layout of the paper and propagates shardings."""

    name = "shard"
    summary = "assign a layout's shardings and propagate them (inserts reshard ops)"
    runs_after = ("pad-heads", "pad-dims", "fuse-parallel-block")

    #: Feed-forward layout: 1d-ws, 2d-ws, wg-x, wg-xy, wg-xyz.
    ffn: str = "1d-ws"
    #: Attention layout: heads (sharded over heads) or batch (multiquery K/V over batch).
    attn: str = "heads"
    #: Mixture of experts: the mesh axes that shard the expert dim X, joined by '+' (``x+y``);
    #: ``auto``: the longest prefix of the mesh axes whose devices divide the experts; ``none``:
    #: every expert on every device, each sliced over all axes.
    experts: str = "auto"
    #: Grouped-query heads K x G: ``shard`` puts K over the longest prefix of the head axes it
    #: divides and G over the rest; ``replicate`` keeps the K/V heads whole and shards G over all
    #: of them. (``pad`` and ``auto`` are spec settings: the driver pads with pad-heads first.)
    kv: str = "shard"

    def __post_init__(self) -> None:
        if self.ffn not in FFN_LAYOUTS:
            raise PassError(f"shard: unknown ffn layout {self.ffn!r}; valid: {', '.join(FFN_LAYOUTS)}")
        if self.attn not in ATTN_LAYOUTS:
            raise PassError(f"shard: unknown attn layout {self.attn!r}; valid: {', '.join(ATTN_LAYOUTS)}")
        if self.kv not in ("shard", "replicate"):
            raise PassError(f"shard: unknown kv option {self.kv!r}; valid: shard, replicate")

    def run(self, module: Module) -> PassResult:
        if module.n_devices == 1:
            return PassResult(module, {"skipped (one device)": 1})
        stats: dict[str, int] = {}
        if any(d.axes or t.partial for f in module.functions for t in f.value_types.values() for d in t.dims):
            raise PassError("shard: the module is already sharded")
        xs = {t.size("X") for f in module.functions for t in f.value_types.values() if t.has("X")}
        if self.experts == "auto":
            experts = default_expert_axes(xs.pop(), module.mesh) if xs else ()
        else:
            experts = () if self.experts == "none" else tuple(a for a in self.experts.split("+") if a)
        layout = Layout(self.ffn, self.attn, module.mesh, experts=experts)
        if experts:
            stats[f"experts over {{{','.join(experts)}}}"] = 1
        batches = {p.type.size("B") for f in module.entries for p in f.params_with_role("cache") if p.type.has("B")}
        if len(batches) == 1:
            split = split_for_batch(layout, batches.pop())
            if split.mesh != layout.mesh:
                (a, sub), = (r for r in split.roles if len(r) == 2)
                stats[f"mesh axis {a}={layout.sizes[a]} split into {a}={split.sizes[a]} x {sub}={split.sizes[sub]} "
                      "for the batch"] = 1
                layout, module = split, replace(module, mesh=split.mesh)
        ks = {t.size("K") for f in module.functions for t in f.value_types.values() if t.has("K")}
        heads = head_split(layout, ks.pop() if ks else 1, self.kv)
        count = [0]
        replaced: dict[str, Function] = {}
        prepared: list[TensorType] | None = None
        prep = module.prepare
        if prep is not None:  # load time: checkpoint weights in their layout, packed/quantized alike
            p_params = [replace(q, type=param_type(layout, q.name, q.role, q.type, heads, q.kind)) for q in prep.params]
            new_prep, n = propagate(layout, ModuleContext(module), prep, p_params,
                                    {q.name: q.role for q in prep.params}, {}, [None] * len(prep.returns))
            replaced[prep.name] = new_prep
            prepared = list(new_prep.result_types)
            count[0] += n

        def entry_params(entry: Function) -> list[Param]:
            w_types = iter(prepared or ())
            return [replace(q, type=next(w_types) if prepared is not None and q.role == "weight" else
                            param_type(layout, q.name, q.role, q.type, heads, q.kind)) for q in entry.params]

        def body(fn: Function, site: ScanSite, ctx: ModuleContext) -> Function:
            roles = {q.name: q.role for q in site.entry.params}
            e_types = {q.name: q.type for q in entry_params(site.entry)}
            nc, nk = site.scan.carry, site.scan.consts
            b_params, b_roles = [], {}
            for i, (bp, v) in enumerate(zip(fn.params, site.scan.operands)):
                role = roles.get(v, "act")
                if i < nc:
                    t = rest_type(layout, bp.type)
                elif i < nc + nk:
                    t = bp.type  # constants (positions) stay replicated
                elif role == "weight" and prepared is not None:
                    t = e_types[v].drop("N")  # what @prepare hands the entry, one layer of it
                else:
                    t = param_type(layout, bp.name, role, bp.type, heads, bp.kind)
                b_params.append(replace(bp, type=t))
                b_roles[bp.name] = role
            targets = [b_params[i].type for i in range(nc)] + [None] * (len(fn.returns) - nc)
            new_body, n = propagate(layout, ctx, fn, b_params, b_roles, {}, targets)
            count[0] += n
            return new_body

        def entry(fn: Function, ctx: ModuleContext) -> Function:
            bodies = (ctx.function(sc.body.name) for sc in fn.ops if isinstance(sc, Scan))
            sigs = {b.name: (tuple(q.type for q in b.params), b.result_types) for b in bodies}
            new_entry, n = propagate(layout, ctx, fn, entry_params(fn), {q.name: q.role for q in fn.params},
                                     sigs, [None] * len(fn.returns))
            count[0] += n
            return new_entry

        fns = rewrite_entries(module, body, entry, replaced)
        total = count[0]
        out = module.with_functions([fns.get(f.name, f) for f in module.functions])
        return PassResult(out, {**stats, "reshards inserted": total})
