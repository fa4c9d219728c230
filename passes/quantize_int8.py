"""``quantize-int8``: weight-only int8 with per-output-channel scales (reference §9).

Every weight that only feeds matmuls (einsums), directly or through the collectives that move
it, is quantized once at load time in ``@prepare`` and stored as int8 plus f32 scales; the
entries and layer bodies take the int8 weight and its scales and dequantize right before each
einsum, so the matmul itself runs in the weight's float type (never an int8-output matmul).
Scales reduce over the dims the einsum contracts, so they have the weight's output dims and,
when the pass runs after ``shard``, the weight's sharding of them. A packed contraction dim (the
fused output projection) gets a scale per segment. Collectives that moved the float weight now
move the int8 weight and, where the scale has the dim, the scale: communication shrinks too.

On one device, a table that embeddings gather from and an einsum also contracts (a tied
embedding read as the output head, ``BLE,VE->BLV``) is quantized too, with one scale per row (reduce ``E``): the head
reads all of it on every decode step, and the gather dequantizes just the rows it takes. A table
that is only gathered (an untied embedding: one row per token) and other weights used by
anything but einsums (norm scales, biases) stay in float; the notes list them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.builder import FunctionBuilder
from ir.collectives import Reshard
from ir.errors import PassError
from ir.graph import readers
from ir.module import PREPARE, Function, Module, ModuleContext, Param
from ir.ops import Einsum, Op, Scan
from ir.quant_ops import Dequantize, Quantize
from ir.retype import ScanSite, rewrite_entries
from ir.types import TensorType
from passes.base import Pass, PassResult
from passes.registry import register

#: Ops that only move a weight; they are replayed on the int8 weight (and on its scales).
MOVES = frozenset({"all_gather", "local_slice", "reshard"})
#: Ops that bring an einsum's activation operand to the einsum's layout.
ACTIVATION_MOVES = frozenset({"all_gather", "local_slice", "reshard", "reduce_scatter", "all_reduce", "all_to_all"})


@dataclass(frozen=True)
class QuantSpec:
    reduce: str
    segments: tuple[int, ...] = ()
    groups: int = 1


def _einsum_reduce(op: Op, v: str, t: TensorType) -> str:
    (terms, out) = op.terms
    return "".join(c for c in t.names if c not in out)


def _analyze(fn: Function, root: str, uses: dict[str, list[Op]]) -> tuple[set[str] | None, str]:
    """The contracted-dim sets of the einsums that ``root`` reaches through moves, or (None, why).
    An embedding gather from ``root`` adds the table's row dims (``E``): rows are scaled alike."""
    types = fn.value_types
    reduces: set[str] = set()
    stack = [root]
    while stack:
        v = stack.pop()
        if v in fn.returns:
            return None, f"returned by @{fn.name}"
        for op in uses.get(v, []):
            if op.kind in MOVES:
                stack.append(op.result)
            elif isinstance(op, Einsum):
                reduces.add(_einsum_reduce(op, v, types[v]))
            elif isinstance(op, Scan):
                continue  # the body is analysed on its own
            elif op.kind == "embed" and op.operands[0] == v:
                reduces.add("".join(c for c in types[v].names if c != "V") + _GATHER)
            else:
                return None, f"used by {op.kind} in @{fn.name}"
    return reduces, ""


#: Marks a row-scale set coming from an embedding gather (tied with an einsum's, or kept float).
_GATHER = "@gather"


def _identity_prepare(m: Module) -> Function:
    ws = m.entries[0].params_with_role("weight")
    return Function(PREPARE, ws, (), tuple(p.name for p in ws), tuple(p.type for p in ws))


class _Rewriter:
    """Rebuilds one function with some weight params split into (int8, scale)."""

    def __init__(self, fn: Function, ctx: ModuleContext):
        self.fn = fn
        self.b = FunctionBuilder.over(fn, ctx)  # every old name stays taken
        self.ops = self.b.ops
        self.types = self.b.types

    def emit(self, op: Op, hint: str | None = None) -> str:
        return self.b.append(op, hint or "v")[0]

    def run(self, params: list[Param], quant: dict[str, tuple[str, QuantSpec]]) -> Function:
        """``quant``: weight param -> (its scale param, spec); ``params`` is the new param list."""
        self.types.clear()
        self.types.update({p.name: p.type for p in params})
        self.b.namer.taken |= set(self.types)
        sv = {w: s for w, (s, _) in quant.items()}
        spec_of = {w: spec for w, (_, spec) in quant.items()}
        for op in self.fn.ops:
            if isinstance(op, Scan):  # each int8 weight travels with its scales
                ins = tuple(x for o in op.operands for x in ((o, sv[o]) if o in sv else (o,)))
                self.emit(op.with_(operands=ins, types=()))
                continue
            if not any(o in sv for o in op.operands):
                self.emit(op.with_(types=()))
                continue
            if op.kind in MOVES:  # move the int8 weight, and its scales where they have the dim
                (u,) = op.operands
                st = self.types[sv[u]]
                if isinstance(op, Reshard):
                    q_new = self.emit(op.with_(types=(op.type.with_dtype("i8"),)))
                    tgt = TensorType(st.dtype, tuple(d if d.name == "S" else op.type.dim(d.name) for d in st.dims))
                    s_new = sv[u] if tgt == st else self.emit(
                        Reshard(results=(), operands=(sv[u],), types=(tgt,), reason=op.reason), sv[u])
                else:
                    q_new = self.emit(op.with_(types=()))
                    s_new = self.emit(op.with_(results=(), operands=(sv[u],), types=()), sv[u]) \
                        if st.has(op.dim) else sv[u]
                sv[q_new], spec_of[q_new] = s_new, spec_of[u]
                continue
            ops = list(op.operands)  # an einsum: dequantize each int8 operand right before it
            # ... and before the collectives that bring its other operands to it, as when the pass
            # runs before shard (which inserts those right before the einsum): the same program
            # whether int8 comes before or after sharding
            mark = len(self.ops)
            deq_in = {x for o in ops if o in sv for x in (o, sv[o])}
            at, needed = mark, set(ops)
            while at > 0 and self.ops[at - 1].kind in ACTIVATION_MOVES and set(self.ops[at - 1].results) & needed \
                    and not set(self.ops[at - 1].results) & deq_in:
                at -= 1
                needed |= set(self.ops[at].operands)
            for i, o in enumerate(ops):
                if o in sv:
                    sp = spec_of[o]
                    ops[i] = self.emit(Dequantize(results=(), operands=(o, sv[o]), types=(), reduce=sp.reduce,
                                                  segments=sp.segments, groups=sp.groups,
                                                  dtype=self.fn.value_types[o].dtype), f"{o}_deq")
            self.ops[at:] = self.ops[mark:] + self.ops[at:mark]
            self.emit(op.with_(operands=tuple(ops), types=()))
        rets = self.fn.returns
        return Function(self.fn.name, tuple(params), tuple(self.ops), rets, tuple(self.types[r] for r in rets),
                        self.fn.entry)


@register
@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """Quantizes the matmul weights to int8 with per-output-channel f32 scales."""

    name = "quantize-int8"
    summary = "int8 weights + per-channel scales, quantized at load time, dequantized before each einsum"
    runs_after = ("pad-heads", "pad-dims", "fuse-parallel-block")

    def run(self, module: Module) -> PassResult:
        if any(op.kind == "collective_einsum" for f in module.functions for op in f.ops):
            raise PassError("quantize-int8: run it before collective-einsum")
        if not module.entries:
            return PassResult(module, {"weights quantized": 0})
        if any(p.type.dtype == "i8" for p in module.entries[0].params_with_role("weight")):
            raise PassError("quantize-int8: the weights are already int8")
        prep = module.prepare or _identity_prepare(module)
        weights = [p.name for p in module.entries[0].params_with_role("weight")]
        reduce_of, why = _contractions(module, weights)
        chosen = _choose(prep, weights, reduce_of, why, module.n_devices == 1)
        if not chosen:
            return PassResult(module, {"weights quantized": 0}, tuple(f"kept {w}: {r}" for w, r in why.items()))
        ctx = ModuleContext(module)
        new_prep, scale_t = _quantized_prepare(prep, weights, chosen, ctx)
        out_fns = _quantized_entries(module, chosen, scale_t, {PREPARE: new_prep})
        fns = [out_fns.get(f.name, f) for f in module.functions]
        if module.prepare is None:
            fns = [new_prep, *fns]
        out = module.with_functions(fns)
        before = sum(p.type.local_nbytes(module.mesh_sizes) for p in module.entries[0].params_with_role("weight"))
        after = sum(p.type.local_nbytes(out.mesh_sizes) for p in out.entries[0].params_with_role("weight"))
        stats = {"weights quantized": len(chosen), "weights kept in float": len(why),
                 "weight bytes per device before (current layout)": before, "weight bytes per device after (current layout)": after}
        notes = tuple(f"int8 {w}: scales over {sp.reduce}" + (f", one per segment {list(sp.segments)}"
                                                              if sp.segments else "") for w, sp in chosen.items())
        notes += tuple(f"kept {w} in float: {r}" for w, r in why.items())
        return PassResult(out, stats, notes)


def _contractions(module: Module, weights: list[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Which weights only feed einsums, and over which contracted dims (entries and scan
    bodies); the others with the reason they stay in float."""
    reduce_of: dict[str, set[str]] = {w: set() for w in weights}
    why: dict[str, str] = {}
    for e in module.entries:
        uses = readers(e)
        for w in weights:
            r, reason = _analyze(e, w, uses)
            if r is None:
                why.setdefault(w, reason)
            else:
                reduce_of[w] |= r
        for sc in [op for op in e.ops if isinstance(op, Scan)]:
            body = module.function(sc.body.name)
            b_uses = readers(body)
            for bp, v in zip(body.params, sc.operands):
                if v in reduce_of:
                    r, reason = _analyze(body, bp.name, b_uses)
                    if r is None:
                        why.setdefault(v, reason)
                    else:
                        reduce_of[v] |= r
    return reduce_of, why


def _choose(prep: Function, weights: list[str], reduce_of: dict[str, set[str]],
            why: dict[str, str], one_device: bool) -> dict[str, QuantSpec]:
    """The weights to quantize (matrices contracted one way), with their scale layout; the
    reasons for the others are added to ``why``. A gathered table only on one device: on a
    mesh, shard moves it with ops this pass does not replay on int8 (quantizing before or
    after shard must give the same program)."""
    chosen: dict[str, QuantSpec] = {}
    p_types = prep.value_types
    producers = {r: op for op in prep.ops for r in op.results}
    for w, ret in zip(weights, prep.returns):
        t = p_types[ret]
        if w in why:
            continue
        gathered = {r for r in reduce_of[w] if r.endswith(_GATHER)}
        if gathered and not reduce_of[w] - gathered:
            why[w] = "only gathered (one row per token)"
            continue
        if gathered and not one_device:
            why[w] = "gathered on a mesh (shard moves the table for its lookups, e.g. by all_to_all)"
            continue
        if gathered and {r[: -len(_GATHER)] for r in gathered} != reduce_of[w] - gathered:
            why[w] = f"gathered and contracted differently: {sorted(reduce_of[w])}"
            continue
        reduce_of[w] -= gathered
        if len(reduce_of[w]) != 1:
            why[w] = "no einsum uses it" if not reduce_of[w] else f"contracted differently: {sorted(reduce_of[w])}"
            continue
        (red,) = reduce_of[w]
        if not red or t.rank - (1 if t.has("N") else 0) < 2:
            why[w] = "not a matrix"
            continue
        pack = producers.get(ret)
        if pack is not None and pack.kind == "concat" and red == pack.into:
            sizes = tuple(p_types[o].size(c) for o, c in zip(pack.operands, pack.dims))
            chosen[w] = QuantSpec(red, sizes, pack.groups)
        else:
            chosen[w] = QuantSpec(red)
    return chosen


def _quantized_prepare(prep: Function, weights: list[str], chosen: dict[str, QuantSpec],
                       ctx: ModuleContext) -> tuple[Function, dict[str, TensorType]]:
    """@prepare quantizing each chosen result (its scale, ``W_scale``, follows it), and the
    scales' types."""
    pr = _Rewriter(prep, ctx)
    pr.types.clear()
    pr.types.update({p.name: p.type for p in prep.params})
    for op in prep.ops:
        pr.emit(op.with_(types=()))
    rets: list[str] = []
    for w, ret in zip(weights, prep.returns):
        if w not in chosen:
            rets.append(ret)
            continue
        sp = chosen[w]
        q = Quantize(results=(), operands=(ret,), types=(), reduce=sp.reduce, segments=sp.segments,
                     groups=sp.groups)
        rets += pr.b.append(q.with_(results=(pr.b.namer.fresh(f"{w}_int8"), _scale_name(w))))
    new_prep = Function(PREPARE, prep.params, tuple(pr.ops), tuple(rets), tuple(pr.types[r] for r in rets))
    return new_prep, {w: pr.types[_scale_name(w)] for w in chosen}


def _scale_name(weight: str) -> str:
    return f"{weight}_scale"


def _quantized_entries(module: Module, chosen: dict[str, QuantSpec], scale_t: dict[str, TensorType],
                       out_fns: dict[str, Function]) -> dict[str, Function]:
    """Entries and scan bodies taking int8 weights plus scales, dequantizing before each einsum
    (ir/retype.py ``rewrite_entries``); ``out_fns`` holds the new @prepare."""
    def body(fn: Function, site: ScanSite, ctx: ModuleContext) -> Function:
        received = site.received
        params: list[Param] = []
        quant: dict[str, tuple[str, QuantSpec]] = {}
        for bp in fn.params:
            v = received.get(bp.name, "")
            if v in chosen:  # stacked along N in the entry, one layer in the body
                sname = _scale_name(bp.name)
                params += [Param(bp.name, bp.type.with_dtype("i8"), bp.role, bp.kind),
                           Param(sname, scale_t[v].drop("N"), bp.role, "scale")]
                quant[bp.name] = (sname, chosen[v])
            else:
                params.append(bp)
        return _Rewriter(fn, ctx).run(params, quant)

    def entry(fn: Function, ctx: ModuleContext) -> Function:
        params: list[Param] = []
        for p in fn.params:
            if p.name in chosen:
                params += [Param(p.name, p.type.with_dtype("i8"), "weight", p.kind),
                           Param(_scale_name(p.name), scale_t[p.name], "weight", "scale")]
            else:
                params.append(p)
        return _Rewriter(fn, ctx).run(params, {w: (_scale_name(w), chosen[w]) for w in chosen})

    return rewrite_entries(module, body, entry, out_fns)
