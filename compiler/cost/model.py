"""Prices a compiled module on a chip: per op, per layer, per step; memory per chip.

Everything is read off the compiled IR and its collective ledger, so whatever the passes did
(padded heads, fused weights, int8 params, gathered weights, looped collectives) is priced:

* **FLOPs** of an einsum are 2 x the product of the local sizes of all its dims (1 x for a
  single-operand einsum); other ops have no matmul FLOPs (they are memory-bound).
* **HBM bytes** of an einsum (or a copy) are the local bytes of the operands it reads and the
  results it writes, each classed by where it comes from: ``weight`` (weight params and what is gathered,
  sliced or dequantized from them), ``kv`` (the KV cache; ``cache_update`` writes only the new
  positions, in place) or ``act`` (activations). Elementwise ops, norms, softmax, rope and
  masks are fused with the einsums around them (as XLA fuses them): they move nothing of their
  own, the tensors they pass on are priced where einsums read and write them. ``dequantize``
  and ``local_slice`` are fused into their consumers (who read the int8 weights / the slice),
  and ``embed`` reads only the rows it gathers. int8 weights are i8 params, so they cost 1 byte per element.
* **Communication** comes from the ledger (passes/ledger.py): each entry's volume per device
  (the paper's accounting, App. A.1's (K-1)/K dropped as the paper's analysis drops it) at the
  chip's interconnect bandwidth (hardware.py states the one-constant convention), so that with
  nothing overlapped the layouts rank by the paper's volumes (Fig. 3's crossovers).
* **Efficiencies** (compiler/cost/efficiency.py): the ``bound`` prices at the peaks with no
  latencies; ``calibrated`` divides FLOP/s (by matmul shape: for a looped collective einsum, the
  shape of one step's chunk, its collective's dim 1/K as long), HBM and link bandwidth by their
  achieved fractions and adds a latency per ring step, a fixed cost per layer call, and a cost
  per element of a narrow weight (int8 through its dequantize, bf16) converted in its dot.

Combination rule (the physical overlap), per op: ``t = max(flops / peak, hbm_bytes / hbm_bw) +
op_overhead`` (its roofline). A collective of activations is exposed, ``t = work + comm``. A
looped collective einsum (the ledger marks it looped) runs K steps, each overlapping one chunk's
transfer with the previous chunk's einsum, and the first (all-gather) or last (reduce-scatter)
chunk's einsum has nothing beside it: ``t = max(E, C + E / K)``; only ``t - E`` is exposed.
With ``overlap`` on (looped or bidirectional), a reduce-scatter the loop pass could not fuse
(a split or a sum of fused projections in between) is priced as its producing einsum's loop,
as the paper pairs every collective with its einsum (never slower than leaving it exposed), and
a collective of a *weight* (depends on no activation) is fetched ahead, beside the compute:
it hides only behind compute time that leaves the links free (ops that are not exposed
collectives; for a looped op, its compute beyond its own transfer), the excess is exposed, and
the next call's gathered weights occupy a prefetch buffer (``Memory.prefetch``). With
``overlap = none`` every collective but a looped one is exposed. A function's time is the sum
over its ops plus the excess and the per-call overhead; a step is the sum over the functions
an entry runs, layer bodies counted once per layer (``repeats_of``); a ``prepare`` function
(load time) is not part of a step. The components reported beside the time are the plain sums
of each term over the ops, so ``max(compute, memory) + comm_exposed <= time <= compute +
memory + comm_exposed + overhead``.

Op kinds are priced through ``OP_RULES`` (add a row for a new kind); an unknown kind is priced
as elementwise memory traffic of its operands and results.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping

from compiler.cost.efficiency import BOUND, Efficiency
from compiler.cost.hardware import Chip
from ir.module import Function, Module
from ir.ops import Op, parse_einsum
from ir.types import TensorType
from passes.ledger import LedgerEntry, ledger, repeats_of

#: Ops whose result is the same data as operand 0 (moved, sliced, converted): it keeps its class.
PASS_THROUGH = frozenset({"all_gather", "reduce_scatter", "all_reduce", "all_to_all", "ppermute", "local_slice",
                          "reshard", "cast", "dequantize", "concat", "split", "flatten", "unflatten",
                          "cache_update"})
#: Activation collectives priced as their producing einsum's loop when overlap is on, and the
#: free ops (views, sums of partial sums) they may reach it through.
PAIRED = frozenset({"reduce_scatter"})
PAIR_THROUGH = frozenset({"split", "binary", "flatten", "unflatten", "concat", "cast"})
#: Ops fused into their consumers: no HBM traffic of their own; consumers read their sources.
FUSED = frozenset({"dequantize", "local_slice"})


@dataclass(frozen=True)
class Cost:
    """What one op does locally: matmul FLOPs, bytes read by class, bytes written."""

    flops: float = 0.0
    reads: Mapping[str, float] = field(default_factory=dict)
    writes: float = 0.0
    dtype: str = "bf16"
    smallest: float = math.inf  # smallest local matmul dim (rows, cols, contraction): sets its efficiency
    converts: float = 0.0  # elements of narrow (int8, bf16) weights converted inside the op (Efficiency.convert_s)


@dataclass
class View:
    """An op in its function, for the rules: types, local sizes, what reading an operand costs."""

    op: Op
    fn: Function
    mesh: Mapping[str, int]
    read_bytes: Mapping[str, float]
    classes: Mapping[str, str]

    @property
    def ins(self) -> list[TensorType]:
        t = self.fn.value_types
        return [t[o] for o in self.op.operands]

    def local(self, t: TensorType) -> dict[str, int]:
        return {d.name: s for d, s in zip(t.dims, t.local_shape(self.mesh))}

    def reads(self, operands=None) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.op.operands if operands is None else operands:
            c = self.classes.get(o, "act")
            out[c] = out.get(c, 0.0) + self.read_bytes[o]
        return out

    def writes(self) -> float:
        return float(sum(t.local_nbytes(self.mesh) for t in self.op.types))

    def converts(self) -> float:
        """Elements of the weight operands held narrower than 32 bits (an int8 weight through its
        fused dequantize, a bf16 one): what a chip that multiplies in f32 converts in the dot."""
        n = 0.0
        for o, t in zip(self.op.operands, self.ins):
            if self.classes.get(o) == "weight":
                elems = math.prod(t.local_shape(self.mesh))
                if t.local_nbytes(self.mesh) < 4 * elems:
                    n += elems
        return n


def einsum_flops(spec: str, sizes: Mapping[str, int]) -> float:
    terms, out = parse_einsum(spec)
    letters = set("".join(terms)) | set(out)
    n = math.prod(sizes[c] for c in letters)
    return float(2 * n if len(terms) > 1 else n)


def matmul_smallest_dim(spec: str, sizes: Mapping[str, int]) -> float:
    """The smallest of an einsum's rows (first operand only), columns (second only) and
    contraction (both, not in the output); batch letters (everywhere) count for none."""
    terms, out = parse_einsum(spec)
    if len(terms) < 2:
        return math.inf
    a, b = set(terms[0]), set(terms[1])
    groups = (a - b, b - a, (a & b) - set(out))
    return float(min(math.prod(sizes[c] for c in g) for g in groups))


def _elementwise(v: View) -> Cost:
    return Cost(0.0, v.reads(), v.writes())


def _free(v: View) -> Cost:
    return Cost()


def _einsum(v: View) -> Cost:
    sizes: dict[str, int] = {}
    for t in (*v.ins, *v.op.types):
        sizes.update(v.local(t))
    return Cost(einsum_flops(v.op.spec, sizes), v.reads(), v.writes(), v.op.type.dtype,
                matmul_smallest_dim(v.op.spec, sizes), v.converts())


def _collective_einsum(v: View) -> Cost:
    """Looped all-gather + einsum(s) or einsum + reduce-scatter (ir/collectives.py): the FLOPs of
    its einsums. All-gather: operand 0, gathered along ``dim``, is the first term of every spec,
    operand i + 1 the second term of spec i. Reduce-scatter: one spec over operands 0 and 1 (the
    scatter happens on the result). Every letter of an einsum appears in its operands."""
    op, ins = v.op, v.ins
    specs = tuple(getattr(op, "specs", ()) or ())
    if getattr(op, "collective", "") == "all_gather":
        x = ins[0]
        keep = tuple(a for a in x.dim(op.dim).axes if a not in op.axes)
        g = x.with_axes(op.dim, keep)
        pairs = [(g, w) for w in ins[1:]]
    else:
        pairs = [(ins[0], ins[1])]
    k = math.prod(v.mesh.get(ax, 1) for ax in op.axes)
    flops, smallest = 0.0, math.inf
    for spec, (a, b) in zip(specs, pairs):
        sizes = {**v.local(a), **v.local(b)}
        flops += einsum_flops(spec, sizes)
        # each of the K loop steps multiplies one chunk: the collective's dim is 1/K as long
        chunk = {**sizes, op.dim: max(1, sizes[op.dim] // k)} if op.dim in sizes else sizes
        smallest = min(smallest, matmul_smallest_dim(spec, chunk))
    return Cost(flops, v.reads(), v.writes(), op.type.dtype, smallest, v.converts())


def _embed(v: View) -> Cost:
    table, tokens = v.op.operands
    rows = float(v.op.type.local_nbytes(v.mesh))  # only the gathered rows are read ...
    full = float(v.fn.value_types[table].local_nbytes(v.mesh))
    rows *= v.read_bytes[table] / full if full else 1.0  # ... as stored (an int8 table: i8 rows + scales)
    return Cost(0.0, {v.classes.get(table, "weight"): rows, "act": v.read_bytes[tokens]}, v.writes())


def _cache_update(v: View) -> Cost:
    _, new, pos = v.op.operands  # in place: reads the new values, writes them into the cache
    return Cost(0.0, v.reads([new, pos]), float(v.fn.value_types[new].local_nbytes(v.mesh)))


def _collective(v: View) -> Cost:
    return Cost()  # priced from the ledger as communication


OP_RULES: dict[str, Callable[[View], Cost]] = {
    "einsum": _einsum,
    "collective_einsum": _collective_einsum,
    "embed": _embed,
    "cache_update": _cache_update,
    "scan": _free,  # its body is priced once per layer
    "pipeline": _free,  # its stage body is priced once per schedule step (passes/ledger.py repeats_of)
    "dequantize": _free,  # fused: the consuming einsum reads the int8 weights and scales
    "local_slice": _free,  # fused: the consumer reads the slice
    "quantize": _elementwise,  # only in @prepare, which runs at load time
    "concat": _elementwise, "split": _elementwise, "flatten": _elementwise, "unflatten": _elementwise,
    # elementwise ops and their reductions fuse with the einsums around them (XLA fuses them into
    # the producer's output or the consumer's input): the tensors they pass on are priced where
    # an einsum (or a copy) reads or writes them
    "unary": _free, "binary": _free, "scale": _free, "cast": _free,
    "norm": _free, "softmax": _free, "rope": _free, "causal_mask": _free,
    "reshard": _elementwise,
}
for _k in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "ppermute"):
    OP_RULES[_k] = _collective


#: Ops that apply a body function (priced through the body, ``repeats_of`` times per step).
BODY_OPS = ("scan", "pipeline")


@dataclass(frozen=True)
class OpPrice:
    function: str
    value: str
    kind: str
    flops: float
    bytes: Mapping[str, float]  # HBM bytes read + written, by class
    compute_s: float
    memory_s: float
    comm_s: float
    exposed_comm_s: float
    time_s: float
    looped: bool = False


@dataclass(frozen=True)
class Components:
    """Seconds spent per term (sums over ops) and the combined time (see the module docstring)."""

    compute: float = 0.0
    weights: float = 0.0
    kv: float = 0.0
    activations: float = 0.0
    comm: float = 0.0
    comm_exposed: float = 0.0
    overhead: float = 0.0
    time: float = 0.0
    flops: float = 0.0

    def __add__(self, o: "Components") -> "Components":
        return Components(*(a + b for a, b in zip(astuple(self), astuple(o))))

    def __mul__(self, k: float) -> "Components":
        return Components(*(a * k for a in astuple(self)))

    @property
    def memory(self) -> float:
        return self.weights + self.kv + self.activations


def astuple(c: Components) -> tuple[float, ...]:
    return tuple(asdict(c).values())


@dataclass(frozen=True)
class Memory:
    weights: int
    kv: int
    activations: int
    activations_at: str = ""  # the op with the largest working set
    prefetch: int = 0  # the next layer's gathered weights, fetched ahead (overlap != none)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.prefetch


@dataclass(frozen=True)
class Estimate:
    chip: str
    n_devices: int
    tokens: int  # new tokens per step (B x L)
    layers: int
    n_params: int  # nominal, for MFU
    per_layer: Components
    per_step: Components
    memory: Memory
    hbm_bytes: int
    peak_flops: float
    ops: tuple[OpPrice, ...]
    efficiency: Efficiency = BOUND  # calibrated efficiencies, or the bound's peaks

    @property
    def step_time_s(self) -> float:
        return self.per_step.time

    @property
    def mfu(self) -> float:
        """The paper's MFU (§4.1): 2 n_params FLOPs per token at peak, over the step time."""
        ideal = 2.0 * self.n_params * self.tokens / (self.n_devices * self.peak_flops)
        return ideal / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def cost_chip_ms_per_token(self) -> float:
        return 1e3 * self.n_devices * self.step_time_s / self.tokens

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_bytes


# ---- classes and read bytes -----------------------------------------------------------------


def param_classes(module: Module) -> dict[str, dict[str, str]]:
    """function -> value -> class, for params, following scans from entries to their bodies."""
    out: dict[str, dict[str, str]] = {}
    role_class = {"weight": "weight", "cache": "kv"}
    todo = [f for f in module.entries]
    for f in module.entries:
        out[f.name] = {p.name: role_class.get(p.role, "act") for p in f.params}
    seen = set()
    while todo:
        f = todo.pop()
        if f.name in seen:
            continue
        seen.add(f.name)
        cls = value_classes(f, out[f.name], module)
        for op in f.ops:
            body = getattr(op, "body", None)
            if op.kind in BODY_OPS and body is not None and module.has_function(body.name):
                bf = module.function(body.name)
                out.setdefault(bf.name, {})
                for p, o in zip(bf.params, op.operands):
                    out[bf.name][p.name] = cls.get(o, "act")
                todo.append(bf)
    return out


def value_classes(fn: Function, params: Mapping[str, str], module: Module | None = None) -> dict[str, str]:
    cls = dict(params)
    for op in fn.ops:
        if op.kind in PASS_THROUGH and op.operands:
            c = cls.get(op.operands[0], "act")
            for r in op.results:
                cls[r] = c
        elif op.kind in BODY_OPS and module is not None and module.has_function(op.body.name):
            body = module.function(op.body.name)
            bcls = value_classes(body, {p.name: cls.get(o, "act") for p, o in zip(body.params, op.operands)}, module)
            for r, ret in zip(op.results, body.returns):
                cls[r] = bcls.get(ret, "act")
        else:
            for r in op.results:
                cls[r] = "act"
    return cls


def read_bytes_of(fn: Function, mesh: Mapping[str, int]) -> dict[str, float]:
    """What reading each value from HBM costs: its local bytes, or for a fused op's result,
    what reading that op's data operand costs (int8 weights + scales for dequantize)."""
    types = fn.value_types
    out = {p.name: float(p.type.local_nbytes(mesh)) for p in fn.params}
    for op in fn.ops:
        for r, t in zip(op.results, op.types):
            out[r] = float(t.local_nbytes(mesh))
        if op.kind == "dequantize":
            out[op.result] = sum(out[o] for o in op.operands)
    del types
    return out


# ---- pricing --------------------------------------------------------------------------------


def _looped(e: LedgerEntry) -> bool:
    return bool(getattr(e, "looped", False)) or e.kind == "collective_einsum"


def collective_seconds(chip: Chip, eff: Efficiency, e: LedgerEntry, mesh: Mapping[str, int]) -> float:
    """One ledger entry on the links: the paper's volume (its accounting, passes/ledger.py: an
    all-gather's output, a reduce-scatter's input, ...) at the achieved link bandwidth, or the
    chip's hop latency if longer, plus the calibrated latency of its K - 1 ring steps.

    App. A.1's (K-1)/K is dropped, as the paper's analysis does: with it, the one-constant
    bandwidth convention (hardware.py) makes 1- and 2-axis collectives cheaper than the links of
    those axes can carry, and Fig. 3's crossovers move (WG-XY to WG-XYZ from 786,432 tokens to
    1,048,576)."""
    t = chip.collective_seconds(e.bytes_per_device / eff.link, e.axes, mesh)
    return t + (e.participants - 1) * eff.step_latency_s if t > 0 else 0.0


def price_function(module: Module, fn: Function, chip: Chip, classes: Mapping[str, str],
                   entries: list[LedgerEntry], eff: Efficiency = BOUND,
                   prefetch: bool = True) -> tuple[Components, list[OpPrice]]:
    """The ops of one function priced by the module docstring's rule; ``prefetch`` says whether
    weight collectives run ahead beside the compute (any ``overlap`` but ``none``)."""
    mesh = module.mesh_sizes
    cls = value_classes(fn, classes, module)
    rb = read_bytes_of(fn, mesh)
    comm: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        comm.setdefault(e.value, []).append(e)
    prices: list[OpPrice] = []
    parts: list[Components] = []
    producer: dict[str, int] = {}  # value -> the einsum (index into prices) it was computed by
    prefetched = 0.0  # seconds of weight collectives run ahead, beside the compute
    hideable = 0.0  # compute time during which the links are free to carry them
    for op in fn.ops:
        rule = OP_RULES.get(op.kind, _elementwise)
        try:
            c = rule(View(op, fn, mesh, rb, cls))
        except (KeyError, AttributeError, TypeError, ValueError):
            c = _elementwise(View(op, fn, mesh, rb, cls))  # an op the rule cannot read: price its traffic
        reads = dict(c.reads)  # HBM traffic by class: what it reads, plus what it writes
        wc = cls.get(op.result, "act")
        reads[wc] = reads.get(wc, 0.0) + c.writes
        compute = c.flops / (chip.peak(c.dtype) * eff.flops_fraction(c.smallest)) if c.flops else 0.0
        compute += c.converts * eff.convert_s  # narrow weights widened inside the dot (CPU)
        memory = sum(reads.values()) / (chip.hbm_bw * eff.hbm)
        es = comm.get(op.result, [])
        comm_s = sum(collective_seconds(chip, eff, e, mesh) for e in es)
        looped = any(_looped(e) for e in es)
        work = max(compute, memory)
        overhead = chip.op_overhead_s if (c.flops or sum(reads.values()) or comm_s) else 0.0
        source = next((producer[o] for o in op.operands if o in producer), None)
        if looped:
            # K steps: each overlaps one chunk's transfer with the previous chunk's einsum; the
            # first einsum chunk (all-gather) or the last (reduce-scatter) has nothing beside it
            k = max(max(e.participants for e in es), 1)
            t = max(work, comm_s + work / k)
            exposed = t - work
            hideable += max(0.0, compute - comm_s)
        elif comm_s and wc == "weight" and prefetch:
            # a weight's collective depends on no activation: fetched ahead, beside the compute
            prefetched += comm_s
            t, exposed = work, 0.0
        elif comm_s and prefetch and op.kind in PAIRED and source is not None:
            # the paper pairs every reduce-scatter with the einsum that produces its partial sums
            # (§3.5); where the loop pass could not fuse it (a split or sum of fused projections
            # in between) it is priced as that einsum's loop: the einsum's time absorbs it
            k = max(e.participants for e in es)
            p = prices[source]
            pw = max(p.compute_s, p.memory_s)
            both = p.comm_s + comm_s
            # (never slower than leaving it exposed: a scheduler would not pair it then)
            pt = min(max(pw, both + pw / k), p.time_s - parts[source].overhead + comm_s)
            prices[source] = replace(p, time_s=pt + parts[source].overhead, exposed_comm_s=pt - pw, looped=True)
            parts[source] = replace(parts[source], time=pt + parts[source].overhead, comm_exposed=pt - pw)
            t, exposed = 0.0, 0.0
        else:
            t = work + comm_s
            exposed = comm_s
            hideable += compute
        if op.kind in ("einsum", "collective_einsum"):
            producer[op.result] = len(prices)
        elif op.kind in PAIR_THROUGH and source is not None:
            producer[op.result] = source
        t += overhead
        prices.append(OpPrice(fn.name, op.result, op.kind, c.flops, reads, compute, memory, comm_s, exposed, t,
                              looped))
        parts.append(Components(compute, reads.get("weight", 0.0) / (chip.hbm_bw * eff.hbm),
                                reads.get("kv", 0.0) / (chip.hbm_bw * eff.hbm),
                                reads.get("act", 0.0) / (chip.hbm_bw * eff.hbm), comm_s, exposed, overhead, t,
                                c.flops))
    total = Components()
    for part in parts:
        total = total + part
    # prefetched weights hide only behind compute that leaves the links free; the rest is exposed
    late = max(0.0, prefetched - hideable)
    fixed = eff.layer_overhead_s if total.time or late else 0.0
    total = replace(total, comm_exposed=total.comm_exposed + late, overhead=total.overhead + fixed,
                    time=total.time + late + fixed)
    return total, prices


def working_set_bytes(fn: Function, mesh: Mapping[str, int], cls: Mapping[str, str]) -> tuple[int, str]:
    """The largest working set of any one op of ``fn``: its activation operands and results,
    gathered weight copies included. The KV cache (updated in place), weight params and their
    fused slices / dequantized views are counted elsewhere or not at all. Any schedule needs at
    least this much, so like the times it is a lower bound."""
    types = fn.value_types
    params = {p.name for p in fn.params}
    producer = {r: op.kind for op in fn.ops for r in op.results}

    def counted(v: str) -> bool:
        c = cls.get(v, "act")
        if c == "kv":
            return False
        if c == "weight":
            return v not in params and producer.get(v) not in FUSED
        return True

    peak, where = 0, ""
    for op in fn.ops:
        if op.kind in BODY_OPS or op.kind in FUSED:
            continue
        vals = {v for v in (*op.operands, *op.results) if counted(v)}
        n = sum(types[v].local_nbytes(mesh) for v in vals)
        if n > peak:
            peak, where = n, f"@{fn.name} {op.kind} %{op.result}"
    return peak, where


def prefetch_buffer_bytes(module: Module, book: list[LedgerEntry] | None = None) -> int:
    """Bytes per chip that fetching weights ahead needs: the next call's gathered weights (the
    weight collectives that are not looped) are held while the current call still uses its own."""
    classes = param_classes(module)
    book = ledger(module) if book is None else book
    out = 0
    for f in module.functions:
        if f.name not in classes:
            continue
        cls = value_classes(f, classes[f.name], module)
        n = sum(e.bytes_per_device for e in book if e.function == f.name and not _looped(e)
                and cls.get(e.value, "act") == "weight")
        out = max(out, n)
    return out


def memory_per_chip(module: Module, prefetch: bool = False) -> Memory:
    """Weights, KV cache and the largest working set; with ``prefetch``, the buffer that weights
    fetched ahead occupy (:func:`prefetch_buffer_bytes`)."""
    mesh = module.mesh_sizes
    weights, kv = 0, 0
    for f in module.entries:
        weights = max(weights, sum(p.type.local_nbytes(mesh) for p in f.params_with_role("weight")))
        kv = max(kv, sum(p.type.local_nbytes(mesh) for p in f.params_with_role("cache")))
    classes = param_classes(module)
    reps = repeats_of(module)
    act, where = 0, ""
    for f in module.functions:
        if f.name in reps:
            n, w = working_set_bytes(f, mesh, value_classes(f, classes.get(f.name, {}), module))
            if n > act:
                act, where = n, w
    return Memory(weights, kv, act, where, prefetch_buffer_bytes(module) if prefetch else 0)


def nominal_params(module: Module) -> int:
    """Parameter count of an (unpadded) module: the elements of its entries' weight params."""
    seen: dict[str, int] = {}
    for f in module.entries:
        for p in f.params_with_role("weight"):
            seen[p.name] = math.prod(p.type.shape)
    return sum(seen.values())


def tokens_per_step(module: Module) -> int:
    f = module.entries[0]
    for p in f.params:
        if p.name == "tokens":
            return math.prod(p.type.shape)
    return 1


def _bodies(module: Module, fn: Function) -> list[str]:
    """Functions ``fn`` applies through scans, transitively."""
    out: list[str] = []
    for op in fn.ops:
        body = getattr(op, "body", None)
        if op.kind in BODY_OPS and body is not None and module.has_function(body.name) and body.name not in out:
            out.append(body.name)
            out += [b for b in _bodies(module, module.function(body.name)) if b not in out]
    return out


def price(module: Module, chip: Chip, n_params: int | None = None, eff: Efficiency = BOUND,
          overlap: str | None = None) -> Estimate:
    """Prices one step of ``module``'s entry (the first entry when there are several) with the
    efficiencies ``eff`` (the bound by default). ``overlap`` is the spec's setting; None reads it
    off the module (looped collectives present or not). Under ``none`` nothing overlaps: weight
    collectives are exposed like the others, so layouts rank by the paper's analytical volumes."""
    reps = repeats_of(module)
    classes = param_classes(module)
    book = ledger(module)
    if overlap is None:
        overlap = "looped" if any(_looped(e) for e in book) else "none"
    prefetch = overlap != "none"
    entry = module.entries[0]
    run = [entry.name] + [b for b in _bodies(module, entry) if b in reps]
    step, layer, ops = Components(), Components(), []
    layers = 1
    dtypes: Counter[str] = Counter()
    for name in run:
        f = module.function(name)
        comps, prices = price_function(module, f, chip, classes.get(name, {}), [e for e in book if e.function == name],
                                       eff, prefetch)
        ops += prices
        step = step + comps * reps[name]
        if not f.entry:
            layer, layers = comps, reps[name]
        for op in f.ops:
            if op.kind in ("einsum", "collective_einsum"):
                dtypes[op.type.dtype] += 1
    dtype = dtypes.most_common(1)[0][0] if dtypes else "bf16"
    params = n_params if n_params is not None else nominal_params(module)
    return Estimate(chip.name, module.n_devices, tokens_per_step(module), layers, params, layer, step,
                    memory_per_chip(module, prefetch), chip.hbm_bytes, chip.peak(dtype), tuple(ops), eff)
