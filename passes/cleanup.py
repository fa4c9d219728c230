"""``cleanup``: identity folding, collective algebra, common subexpressions, dead code.

Each rule is a small function in an ordered table (see passes/rewrite.py); the pass reports
how often each one matched. The table runs in this order, to a fixed point:

* ``fold-identity``: ``scale`` by 1 and same-dtype ``cast`` are their operand;
* ``reshard-noop`` and ``reshard-chain``: a reshard to the type it already has goes, two
  reshards in a row are one (before ``insert-collectives``);
* collective algebra (after ``insert-collectives``): ``rs-ag-to-ar`` fuses a reduce-scatter
  and the all-gather that undoes its scatter into an all-reduce; ``ag-of-slice``,
  ``slice-of-ag`` and ``a2a-pair`` drop pairs of layout changes that cancel;
* ``cse``, ``dce`` and ``dead-functions``.

Every rewrite that builds an op re-infers its type and fires only when it equals the type it
replaces, so a rule can never change a value's layout; rules that forward a value require the
types to be equal for the same reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ir.collectives import AllReduce
from ir.errors import EinshardError, PassError
from ir.graph import live_ops
from ir.module import PREPARE, Function, Module, ModuleContext
from ir.ops import Op, Scan
from ir.types import TensorType
from passes.base import Pass, PassResult
from passes.registry import register
from passes.rewrite import Rule, drive, op_key, per_function, rename_uses

#: Non-entry functions that ``dead-functions`` keeps although no scan applies them: the
#: runtime calls ``prepare`` itself, once, when the weights are loaded.
KEEP_FUNCTIONS: frozenset[str] = frozenset({PREPARE})


def join_reasons(*reasons: str) -> str:
    """The ledger reason of an op that stands for several: each distinct reason once, in order."""
    out: list[str] = []
    for r in reasons:
        for part in r.split("; ") if r else ():
            if part not in out:
                out.append(part)
    return "; ".join(out)


def _uses(fn: Function) -> Counter[str]:
    """Value name -> number of reads (operands of ops and returned values)."""
    n: Counter[str] = Counter(o for op in fn.ops for o in op.operands)
    n.update(fn.returns)
    return n


# ---- single ops ----------------------------------------------------------------------------


def _fold_identity(fn: Function, m: Module) -> tuple[Function, int]:
    """``scale`` by 1.0 and ``cast`` to the same dtype are their operand."""
    types = fn.value_types
    mapping, keep = {}, []
    for op in fn.ops:
        same_cast = op.kind == "cast" and types[op.operands[0]] == op.type
        unit_scale = op.kind == "scale" and op.factor == 1.0
        if same_cast or unit_scale:
            mapping[op.result] = op.operands[0]
        else:
            keep.append(op)
    if not mapping:
        return fn, 0
    return rename_uses(fn.with_ops(keep), mapping), len(mapping)


def _reshard_noop(fn: Function, m: Module) -> tuple[Function, int]:
    """A ``reshard`` whose operand already has the target type is its operand.

    Sound: a reshard is the same logical tensor in the target layout, and the operand already
    is that tensor in that layout (sharding and pending partial sums included), so
    ``insert-collectives`` would plan no step for it.
    """
    types = fn.value_types
    mapping, keep = {}, []
    for op in fn.ops:
        if op.kind == "reshard" and types[op.operands[0]] == op.type:
            mapping[op.result] = op.operands[0]
        else:
            keep.append(op)
    if not mapping:
        return fn, 0
    return rename_uses(fn.with_ops(keep), mapping), len(mapping)


# ---- pairs: a producer and its consumer ----------------------------------------------------

#: What a pair matcher returns: ``None`` (no match), a value name (the consumer's result is that
#: value) or an op (replaces the consumer; the producer's operands are already defined).
PairMatch = Callable[[Op, Op, dict[str, TensorType]], "str | Op | None"]


def pair_rule(match: PairMatch, *, sole_use: bool) -> Callable[[Function, Module], tuple[Function, int]]:
    """A rewrite of (producer, consumer) op pairs, where the consumer's single operand is the
    producer's single result. With ``sole_use`` the pair matches only when the consumer is the
    producer's only reader (a replacement would otherwise compute the producer twice). A
    producer left without readers goes with its consumer; a pair never overlaps another pair
    matched in the same round (the driver's next round sees the rest)."""

    def rewrite(fn: Function, m: Module) -> tuple[Function, int]:
        types, prod, uses = fn.value_types, fn.producers, _uses(fn)
        ctx = ModuleContext(m)
        touched: set[int] = set()
        new: dict[int, Op | None] = {}
        mapping: dict[str, str] = {}
        for i, outer in enumerate(fn.ops):
            if i in touched or len(outer.operands) != 1 or len(outer.results) != 1:
                continue
            j = prod.get(outer.operands[0])
            if j is None or j in touched:
                continue
            inner = fn.ops[j]
            if len(inner.results) != 1 or len(inner.operands) != 1:
                continue
            if sole_use and uses[inner.result] != 1:
                continue
            got = match(inner, outer, types)
            if got is None:
                continue
            if isinstance(got, str):
                if got == inner.result or types[got] != outer.type:
                    continue
                mapping[outer.result] = got
                new[i] = None
            else:
                if inner.result in got.operands:
                    continue
                try:
                    same = got.infer(tuple(types[o] for o in got.operands), ctx) == outer.types
                except EinshardError:
                    same = False
                if not same:
                    continue
                new[i] = got.with_(results=outer.results, types=outer.types, loc=outer.loc)
            touched.update((i, j))
            if uses[inner.result] == 1:
                new[j] = None
        if not touched:
            return fn, 0
        ops = [new.get(i, op) for i, op in enumerate(fn.ops)]
        return rename_uses(fn.with_ops([op for op in ops if op is not None]), mapping), len(touched) // 2

    return rewrite


def _rs_ag_to_ar(inner: Op, outer: Op, types: dict[str, TensorType]) -> Op | None:
    """A ``reduce_scatter{A}`` on dim d read only by an ``all_gather{A}`` on d is an
    ``all_reduce{A}``.

    Sound: the scatter sums the partial sums over the group of ``A`` and leaves device k of the
    group with block k of d (the composite index over ``A``, major first); gathering over the
    same axes in the same order concatenates blocks 0..g-1 back in place, so every device holds
    the whole sum: an all-reduce. The re-inferred type equals the gather's (``A`` summed, d's
    other axes as they were). With other readers of the scattered value it would be computed
    twice, so the rule then does not fire.
    """
    if (inner.kind, outer.kind) != ("reduce_scatter", "all_gather"):
        return None
    if inner.axes != outer.axes or inner.dim != outer.dim:
        return None
    return AllReduce(results=outer.results, operands=inner.operands, types=outer.types,
                     axes=inner.axes, reason=join_reasons(inner.reason, outer.reason))


def _inverse_pair(first: str, then: str, doc: str) -> PairMatch:
    """``then{A}`` on d of ``first{A}`` on d, when one undoes the other, is ``first``'s operand."""

    def match(inner: Op, outer: Op, types: dict[str, TensorType]) -> str | None:
        if (inner.kind, outer.kind) != (first, then) or inner.axes != outer.axes or inner.dim != outer.dim:
            return None
        return inner.operands[0]

    match.__doc__ = doc
    return match


_ag_of_slice = _inverse_pair("local_slice", "all_gather",
    """``all_gather{A}`` on d of ``local_slice{A}`` on d is the sliced value.

    Sound: the slice keeps block k of d on device k of the group of ``A`` (a value replicated
    over ``A`` beforehand); the gather over the same axes in the same order concatenates blocks
    0..g-1, which is the value before the slice, on every device. Types must be equal (they are,
    by the two rules: the slice appends ``A`` to d's axes, the gather removes that suffix).
    """)

_slice_of_ag = _inverse_pair("all_gather", "local_slice",
    """``local_slice{A}`` on d of ``all_gather{A}`` on d is the gathered operand.

    Sound: after the gather every device of the group holds blocks 0..g-1 of d; slicing keeps
    block k on device k, which is what device k held before the gather. Fires only when the
    types are exactly equal.
    """)


def _a2a_pair(inner: Op, outer: Op, types: dict[str, TensorType]) -> str | None:
    """``all_to_all{A}`` (split c, concat s) of ``all_to_all{A}`` (split s, concat c) is the
    first one's operand.

    Sound: an all-to-all over the group of ``A`` is a permutation of blocks: device k cuts its
    split dim into g equal pieces, sends piece j to device j and concatenates what it receives
    along the concat dim in group order. The second one cuts along that concat dim into the same
    g pieces (the ones received from devices 0..g-1) and sends each back, and device k
    concatenates its own pieces along the first split dim in order: its block before the first.
    """
    if (inner.kind, outer.kind) != ("all_to_all", "all_to_all") or inner.axes != outer.axes:
        return None
    if (inner.split_dim, inner.concat_dim) != (outer.concat_dim, outer.split_dim):
        return None
    return inner.operands[0]


def _reshard_chain(inner: Op, outer: Op, types: dict[str, TensorType]) -> Op | None:
    """A ``reshard`` of a ``reshard`` (whose result nothing else reads) is one reshard from the
    first operand to the final type.

    Sound: each reshard keeps the logical tensor and only changes its layout, so the pair is the
    first operand's tensor in the final layout; partial sums only shrink along the chain, so the
    one reshard creates none (its type rule checks both). ``insert-collectives`` then plans one
    route from the source layout instead of two through an intermediate one.
    """
    if (inner.kind, outer.kind) != ("reshard", "reshard"):
        return None
    return outer.with_(operands=inner.operands, reason=join_reasons(inner.reason, outer.reason))


# ---- common subexpressions and dead code ---------------------------------------------------


def _cse(fn: Function, m: Module) -> tuple[Function, int]:
    """Ops with the same kind, operands, attributes and types compute the same values.

    A collective's ``reason`` only explains it for the ledger, so it does not tell two ops
    apart: the kept op's reason lists the reasons of all it stands for.
    """
    seen: dict[tuple, int] = {}
    mapping: dict[str, str] = {}
    keep: list[Op] = []
    for op in fn.ops:
        op = op.with_(operands=tuple(mapping.get(o, o) for o in op.operands))
        explained = "reason" in op.attrs()
        key = op_key(op.with_(reason="") if explained else op)
        if key in seen:
            k = seen[key]
            mapping.update(zip(op.results, keep[k].results))
            if explained:
                keep[k] = keep[k].with_(reason=join_reasons(keep[k].reason, op.reason))
        else:
            seen[key] = len(keep)
            keep.append(op)
    if not mapping:
        return fn, 0
    return rename_uses(fn.with_ops(keep), mapping), len(fn.ops) - len(keep)


def _dce(fn: Function, m: Module) -> tuple[Function, int]:
    """Ops whose results no returned value depends on."""
    live = live_ops(fn)
    if len(live) == len(fn.ops):
        return fn, 0
    return fn.with_ops([op for i, op in enumerate(fn.ops) if i in live]), len(fn.ops) - len(live)


def _dead_functions(m: Module) -> tuple[Module, int]:
    """Non-entry functions that no scan refers to (``KEEP_FUNCTIONS``, which the runtime calls
    by name, always stay)."""
    used = {op.body.name for f in m.functions for op in f.ops if isinstance(op, Scan)} | KEEP_FUNCTIONS
    keep = [f for f in m.functions if f.entry or f.name in used]
    return (m.with_functions(keep), len(m.functions) - len(keep)) if len(keep) != len(m.functions) else (m, 0)


def _rule(name: str, fn: Callable[[Function, Module], tuple[Function, int]], doc: str | None) -> Rule:
    return Rule(name, per_function(fn), doc or "")


RULES: tuple[Rule, ...] = (
    _rule("fold-identity", _fold_identity, _fold_identity.__doc__),
    _rule("reshard-noop", _reshard_noop, _reshard_noop.__doc__),
    _rule("reshard-chain", pair_rule(_reshard_chain, sole_use=True), _reshard_chain.__doc__),
    _rule("rs-ag-to-ar", pair_rule(_rs_ag_to_ar, sole_use=True), _rs_ag_to_ar.__doc__),
    _rule("ag-of-slice", pair_rule(_ag_of_slice, sole_use=False), _ag_of_slice.__doc__),
    _rule("slice-of-ag", pair_rule(_slice_of_ag, sole_use=False), _slice_of_ag.__doc__),
    _rule("a2a-pair", pair_rule(_a2a_pair, sole_use=False), _a2a_pair.__doc__),
    _rule("cse", _cse, _cse.__doc__),
    _rule("dce", _dce, _dce.__doc__),
    Rule("dead-functions", _dead_functions, _dead_functions.__doc__ or ""),
)


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Folds identities and cancelling collectives, merges common subexpressions and removes
    dead code, to a fixed point."""

    name = "cleanup"
    summary = "fold identities and collective algebra, CSE, dead code and dead functions"

    #: Most rounds of the rule table; still matching after them is a PassError.
    max_rounds: int = 16

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise PassError(f"cleanup: max_rounds must be >= 1, got {self.max_rounds}")

    def run(self, module: Module) -> PassResult:
        out, counts, rounds = drive(module, RULES, self.max_rounds, "cleanup")
        stats = {f"{k} matches": v for k, v in counts.items()}
        stats["rounds"] = rounds
        return PassResult(out, stats)
