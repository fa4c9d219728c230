"""Op kinds: frozen dataclasses with typed attributes and a type/sharding inference rule each.

An op names its SSA results and operands and carries its annotated result types. ``infer``
recomputes the result types from the operand types; the verifier compares the two, and passes
use ``infer`` to build new ops. The rules are generic over dim names and sharding, so layout
passes only set shardings at the boundary and insert collectives where a rule refuses:

* a dim keeps its mesh axes through an op; two operands must agree on a shared dim's axes;
* contracting a sharded dim leaves a partial sum over its axes;
* linear ops (einsum, scale, cast, add of two partials, mul by a non-partial) keep partial
  sums; nonlinear ones refuse them.

Numpy evaluation and JAX lowering live in their own tables in ``runtime/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ir.errors import Location, VerifyError
from ir.types import DTYPES, FLOAT_DTYPES, Dim, TensorType

if TYPE_CHECKING:
    from ir.module import Function


class InferContext(Protocol):
    """What inference may consult beyond operand types: the mesh and the module's functions."""

    mesh: dict[str, int]

    def function(self, name: str) -> "Function": ...


@dataclass(frozen=True)
class Symbol:
    """A reference to a function of the module, printed ``@name``."""

    name: str


OPS: dict[str, type["Op"]] = {}


def op_kind(kind: str):
    """Registers an op class under its textual kind name."""

    def register(cls: type[Op]) -> type[Op]:
        cls.kind = kind
        OPS[kind] = cls
        return cls

    return register


@dataclass(frozen=True, kw_only=True)
class Op:
    """Base of every op: result names, operand names, annotated result types, source location."""

    results: tuple[str, ...]
    operands: tuple[str, ...]
    types: tuple[TensorType, ...]
    loc: Location | None = field(default=None, compare=False, repr=False)

    kind: ClassVar[str] = "op"
    #: (min, max) operand counts; max None = unbounded.
    arity: ClassVar[tuple[int, int | None]] = (0, None)
    #: True for ops that move data between devices.
    is_collective: ClassVar[bool] = False

    @classmethod
    def attr_fields(cls) -> tuple[dataclasses.Field, ...]:
        base = {"results", "operands", "types", "loc"}
        return tuple(f for f in fields(cls) if f.name not in base)

    def attrs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.attr_fields()}

    @property
    def result(self) -> str:
        return self.results[0]

    @property
    def type(self) -> TensorType:
        return self.types[0]

    def infer(self, ins: tuple[TensorType, ...], ctx: InferContext) -> tuple[TensorType, ...]:
        raise VerifyError(f"op '{self.kind}' has no inference rule")

    def with_(self, **changes: Any) -> "Op":
        return dataclasses.replace(self, **changes)

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            """For the type checker only: ops are a union tagged by ``kind``, and code that matched
            a kind reads that kind's attributes (``op.axes`` of an all_gather) without an
            isinstance the checker could follow."""


# ---- shared rule helpers --------------------------------------------------------------------


def fail(msg: str) -> VerifyError:
    return VerifyError(msg)


def require_not_partial(op: str, t: TensorType, what: str = "operand") -> None:
    if t.partial:
        raise fail(
            f"{op} is not linear: its {what} is a partial sum over {{{','.join(sorted(t.partial))}}}; "
            "reduce it first (all-reduce or reduce-scatter)"
        )


def require_unsharded(op: str, t: TensorType, name: str) -> None:
    if t.has(name) and t.dim(name).axes:
        raise fail(
            f"{op} needs dim {name} whole on every device, but it is sharded over "
            f"{{{','.join(t.dim(name).axes)}}}; all-gather it first"
        )


def make_type(op: str, dtype: str, dims, partial=frozenset()) -> TensorType:
    """Builds a result type; a layout the type rejects (an axis on two dims, a partial axis that
    also shards a dim) is a verification error of this op."""
    try:
        return TensorType(dtype, tuple(dims), frozenset(partial))
    except ValueError as e:
        raise fail(f"{op}: the result would be an invalid type: {e}") from None


def merge_dims(op: str, *ts: TensorType) -> dict[str, Dim]:
    """Union of the operands' dims by name; shared dims must agree in size and sharding."""
    out: dict[str, Dim] = {}
    for t in ts:
        for d in t.dims:
            prev = out.get(d.name)
            if prev is None:
                out[d.name] = d
            elif prev.size != d.size:
                raise fail(f"{op}: dim {d.name} has size {prev.size} in one operand and {d.size} in another")
            elif prev.axes != d.axes:
                raise fail(
                    f"{op}: operands disagree on the sharding of dim {d.name}: "
                    f"{{{','.join(prev.axes)}}} vs {{{','.join(d.axes)}}}"
                )
    return out


def promote(*dtypes: str) -> str:
    order = ("bf16", "f16", "f32", "f64")
    floats = [d for d in dtypes if d in FLOAT_DTYPES]
    if not floats:
        raise fail(f"expected a floating-point operand, got {', '.join(dtypes)}")
    return max(floats, key=order.index)


def check_partials_disjoint(op: str, ts: tuple[TensorType, ...]) -> frozenset[str]:
    """A partial operand may only meet operands that are replicated over its partial axes."""
    total: frozenset[str] = frozenset()
    for i, t in enumerate(ts):
        for j, u in enumerate(ts):
            if i != j and t.partial & u.mesh_axes:
                raise fail(
                    f"{op}: operand {i} is a partial sum over {{{','.join(sorted(t.partial))}}} but "
                    f"operand {j} varies over {{{','.join(sorted(t.partial & u.mesh_axes))}}}"
                )
        total |= t.partial
    return total


def require_positional(op: str, x: TensorType, pos: TensorType, whole: str) -> None:
    """Ops that read positions pos[B, L]: x has B, L and ``whole`` (unsharded), no partial sums,
    and pos is laid out like x's B and L."""
    for n in "BL" + whole:
        if not x.has(n):
            raise fail(f"{op} needs an operand with dims B, L and {whole}, got {x.names}")
    require_int(op, pos, "positions")
    if pos.names != "BL":
        raise fail(f"{op} positions must be [B, L], got {pos.names}")
    require_not_partial(op, x)
    require_unsharded(op, x, whole)
    merge_dims(op, x, pos)


def require_int(op: str, t: TensorType, what: str) -> None:
    if t.dtype not in ("i32", "i8"):
        raise fail(f"{op}: {what} must be an integer tensor, got {t.dtype}")


# ---- compute ops ----------------------------------------------------------------------------


def parse_einsum(spec: str) -> tuple[tuple[str, ...], str]:
    if spec.count("->") != 1:
        raise fail(f"einsum spec {spec!r} must have exactly one '->'")
    lhs, out = spec.split("->")
    terms = tuple(lhs.split(","))
    for term in (*terms, out):
        if not all(c.isalpha() and c.isupper() for c in term) or len(set(term)) != len(term):
            raise fail(f"einsum spec {spec!r}: terms must be distinct upper-case dim letters")
    for c in out:
        if not any(c in t for t in terms):
            raise fail(f"einsum spec {spec!r}: output dim {c} appears in no operand")
    return terms, out


@op_kind("einsum")
@dataclass(frozen=True, kw_only=True)
class Einsum(Op):
    """Contraction over named dims, ``BLE,EF->BLF``; contracting a sharded dim gives a partial sum."""

    spec: str
    arity = (1, None)

    @property
    def terms(self) -> tuple[tuple[str, ...], str]:
        return parse_einsum(self.spec)

    def infer(self, ins, ctx):
        terms, out = parse_einsum(self.spec)
        if len(terms) != len(ins):
            raise fail(f"einsum {self.spec!r} has {len(terms)} terms but {len(ins)} operands")
        for i, (term, t) in enumerate(zip(terms, ins)):
            if term != t.names:
                raise fail(f"einsum operand {i} has dims {t.names}, but the spec says {term}")
        dims = merge_dims("einsum", *ins)
        partial = check_partials_disjoint("einsum", ins)
        contracted = [c for c in dims if c not in out]
        for c in contracted:
            partial |= frozenset(dims[c].axes)
        dtype = promote(*(t.dtype for t in ins))
        return (make_type("einsum", dtype, (dims[c] for c in out), partial),)


UNARY_FNS = ("gelu", "gelu_tanh", "silu", "relu", "exp", "tanh", "rsqrt", "neg", "square", "sigmoid")
LINEAR_UNARY = frozenset({"neg"})


@op_kind("unary")
@dataclass(frozen=True, kw_only=True)
class Unary(Op):
    """Elementwise function of one tensor; only linear ones (``neg``) accept partial sums."""

    fn: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        if self.fn not in UNARY_FNS:
            raise fail(f"unknown unary function {self.fn!r}; valid: {', '.join(UNARY_FNS)}")
        (x,) = ins
        if self.fn not in LINEAR_UNARY:
            require_not_partial(f"unary {self.fn}", x)
        promote(x.dtype)
        return (x,)


@op_kind("scale")
@dataclass(frozen=True, kw_only=True)
class Scale(Op):
    """Multiplication by a compile-time constant (linear: keeps partial sums)."""

    factor: float
    arity = (1, 1)

    def infer(self, ins, ctx):
        promote(ins[0].dtype)
        return (ins[0],)


BINARY_FNS = ("add", "sub", "mul", "div", "max")


@op_kind("binary")
@dataclass(frozen=True, kw_only=True)
class Binary(Op):
    """Elementwise op of two tensors broadcast by dim name: result dims are the first operand's
    followed by the second's extra dims."""

    fn: str
    arity = (2, 2)

    def infer(self, ins, ctx):
        if self.fn not in BINARY_FNS:
            raise fail(f"unknown binary function {self.fn!r}; valid: {', '.join(BINARY_FNS)}")
        a, b = ins
        dims = merge_dims(f"binary {self.fn}", a, b)
        if self.fn in ("add", "sub"):
            if a.partial != b.partial:
                raise fail(
                    f"binary {self.fn}: both operands must be partial sums over the same axes "
                    f"({{{','.join(sorted(a.partial))}}} vs {{{','.join(sorted(b.partial))}}})"
                )
            partial = a.partial
        elif self.fn == "mul":
            partial = check_partials_disjoint("binary mul", ins)
        elif self.fn == "div":
            require_not_partial("binary div", b, "divisor")
            partial = check_partials_disjoint("binary div", ins)
        else:
            require_not_partial("binary max", a)
            require_not_partial("binary max", b)
            partial = frozenset()
        return (make_type(f"binary {self.fn}", promote(a.dtype, b.dtype), dims.values(), partial),)


NORM_KINDS = ("layernorm", "rmsnorm")


@op_kind("norm")
@dataclass(frozen=True, kw_only=True)
class Norm(Op):
    """LayerNorm or RMSNorm over one dim, with a scale and (layernorm) an optional bias.

    The normalized dim may be sharded: its statistics are then summed over the dim's axes
    inside the op (a [B, L]-sized all-reduce that the ledger counts). ``size`` > 0: the dim was
    zero-padded (passes/pad_dims.py) and only its first ``size`` entries are real, so the
    statistics divide by ``size`` and the variance drops the padding's share (printed when set)."""

    norm: str
    dim: str
    eps: float
    size: int = field(default=0, metadata={"omit_default": True})  # 0: the dim's own size
    arity = (2, 3)

    def infer(self, ins, ctx):
        if self.norm not in NORM_KINDS:
            raise fail(f"unknown norm {self.norm!r}; valid: {', '.join(NORM_KINDS)}")
        x, *params = ins
        if not x.has(self.dim):
            raise fail(f"norm over {self.dim}, but the operand has dims {x.names}")
        require_not_partial("norm", x)
        if self.size < 0 or self.size > x.size(self.dim):
            raise fail(f"norm size must be 1..{x.size(self.dim)} (the real part of {self.dim}), got {self.size}")
        for p in params:
            if p.names != self.dim or p.dim(self.dim) != x.dim(self.dim) or p.partial:
                raise fail(f"norm parameters must be [{self.dim}={x.size(self.dim)}], got {p}")
        return (x,)


@op_kind("softmax")
@dataclass(frozen=True, kw_only=True)
class Softmax(Op):
    """Softmax over one dim (kept whole on each device)."""

    dim: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        if not x.has(self.dim):
            raise fail(f"softmax over {self.dim}, but the operand has dims {x.names}")
        require_not_partial("softmax", x)
        require_unsharded("softmax", x, self.dim)
        return (x,)


ROPE_STYLES = ("half", "interleaved")


@op_kind("rope")
@dataclass(frozen=True, kw_only=True)
class Rope(Op):
    """Rotary position embedding on the first ``rotary_dim`` entries of D, at positions [B, L]."""

    style: str
    rotary_dim: int
    theta: float
    arity = (2, 2)

    def infer(self, ins, ctx):
        x, pos = ins
        if self.style not in ROPE_STYLES:
            raise fail(f"unknown rope style {self.style!r}; valid: {', '.join(ROPE_STYLES)}")
        require_positional("rope", x, pos, "D")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= x.size("D"):
            raise fail(f"rotary_dim {self.rotary_dim} must be even and in (0, {x.size('D')}]")
        return (x,)


@op_kind("embed")
@dataclass(frozen=True, kw_only=True)
class Embed(Op):
    """Row gather ``table[V, E]`` at ``tokens[B, L]``; a V-sharded table gives a partial sum."""

    arity = (2, 2)

    def infer(self, ins, ctx):
        table, tokens = ins
        if table.names != "VE":
            raise fail(f"embed table must be [V, E], got {table.names}")
        require_int("embed", tokens, "tokens")
        if tokens.names != "BL":
            raise fail(f"embed tokens must be [B, L], got {tokens.names}")
        require_not_partial("embed", table, "table")
        require_not_partial("embed", tokens, "tokens")
        v = table.dim("V")
        dims = (*tokens.dims, table.dim("E"))
        return (make_type("embed", table.dtype, dims, v.axes),)


@op_kind("causal_mask")
@dataclass(frozen=True, kw_only=True)
class CausalMask(Op):
    """Sets scores[..., L, T] to -inf where key position T is after the query position pos[B, L],
    and with a ``window`` > 0 (sliding-window attention) also where T <= pos - window."""

    window: int = field(default=0, metadata={"omit_default": True})  # 0: no window; printed only when set
    arity = (2, 2)

    def infer(self, ins, ctx):
        s, pos = ins
        require_positional("causal_mask", s, pos, "T")
        if self.window < 0:
            raise fail(f"causal_mask window must be >= 0 (0: no window), got {self.window}")
        return (s,)


@op_kind("cache_update")
@dataclass(frozen=True, kw_only=True)
class CacheUpdate(Op):
    """Writes new[B, L, ...] into cache[B, T, ...] at T = pos[B, L]; returns the updated cache."""

    arity = (3, 3)

    def infer(self, ins, ctx):
        cache, new, pos = ins
        require_int("cache_update", pos, "positions")
        if pos.names != "BL":
            raise fail(f"cache_update positions must be [B, L], got {pos.names}")
        if cache.names.replace("T", "L") != new.names or not cache.has("T"):
            raise fail(f"cache_update: cache {cache.names} and new values {new.names} must differ only in T vs L")
        for t in ins:
            require_not_partial("cache_update", t)
        require_unsharded("cache_update", cache, "T")
        require_unsharded("cache_update", new, "L")
        merge_dims("cache_update", cache.drop("T"), new.drop("L"), pos.drop("L"))
        if cache.dtype != new.dtype:
            raise fail(f"cache_update: cache is {cache.dtype} but new values are {new.dtype}")
        return (cache,)


@op_kind("cast")
@dataclass(frozen=True, kw_only=True)
class Cast(Op):
    """Converts the element type (linear: keeps partial sums)."""

    dtype: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        if self.dtype not in DTYPES:
            raise fail(f"cast to unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        return (ins[0].with_dtype(self.dtype),)


@op_kind("scan")
@dataclass(frozen=True, kw_only=True)
class Scan(Op):
    """Applies ``body`` once per layer: ``carry`` operands thread through, the next ``consts``
    are passed unchanged, and the rest are sliced along their leading N dim. Results are the
    final carries followed by the body's extra results stacked along N (like ``lax.scan``)."""

    body: Symbol
    carry: int
    consts: int
    arity = (1, None)

    def infer(self, ins, ctx):
        fn = ctx.function(self.body.name)
        nc, nk = self.carry, self.consts
        if nc < 0 or nk < 0 or nc + nk > len(ins):
            raise fail(f"scan: carry={nc} and consts={nk} do not fit {len(ins)} operands")
        xs = ins[nc + nk:]
        layers = {t.size("N") for t in xs if t.has("N")}
        if len(layers) > 1:
            raise fail(f"scan: stacked operands disagree on the layer count N: {sorted(layers)}")
        for i, t in enumerate(xs):
            if not t.dims or t.dims[0].name != "N" or t.dims[0].axes:
                raise fail(f"scan: stacked operand {nc + nk + i} must have a leading unsharded N dim, got {t}")
        expect = (*ins[: nc + nk], *(t.drop("N") for t in xs))
        got = tuple(p.type for p in fn.params)
        if expect != got:
            raise fail(
                f"scan: body @{fn.name} takes ({', '.join(map(str, got))}) but is given "
                f"({', '.join(map(str, expect))})"
            )
        outs = fn.result_types
        if outs[:nc] != ins[:nc]:
            raise fail(f"scan: body @{fn.name} must return its carries with unchanged types")
        n = layers.pop() if layers else 1
        for t in outs[nc:]:
            if t.has("N"):
                raise fail(f"scan: body @{fn.name} returns {t}, which already has a layer dim N to stack along")
        stacked = tuple(TensorType(t.dtype, (Dim("N", n), *t.dims), t.partial) for t in outs[nc:])
        return (*outs[:nc], *stacked)


# The collective ops register themselves in OPS as well.
import ir.collectives  # registers the collective ops
import ir.fusion_ops  # registers concat, split, flatten, unflatten
import ir.quant_ops  # registers quantize, dequantize
import ir.pipeline_ops  # registers ppermute, pipeline
import ir.moe_ops  # registers top_k, dispatch, combine
import ir.sample_ops  # registers sample
