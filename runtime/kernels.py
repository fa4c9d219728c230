"""Per-op semantics, written once over an array namespace (numpy or jax.numpy).

The numpy reference and the JAX lowering share these rules: each takes the op, its operand
arrays (dims in the order of the operand types) and a Backend that supplies what differs
between the two (erf, the cache scatter, the layer loop, collectives). A rule returns a tuple
of result arrays whose dims follow the op's result types.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from ir.errors import LoweringError
from ir.ops import Op
from ir.types import TensorType
from runtime import cache_windows

Array = Any


class Backend(Protocol):
    """What a rule needs beyond array methods."""

    @property
    def xp(self) -> Any:
        """numpy or jax.numpy."""

    def erf(self, x: Array) -> Array: ...

    def set_rows(self, cache: Array, new: Array, pos: Array) -> Array:
        """cache[b, pos[b, l], ...] = new[b, l, ...] (B first, T/L second); returns the cache."""

    def einsum(self, spec: str, *xs: Array) -> Array: ...

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        """The k largest along the last axis (descending) and their indices."""

    def scatter_rows(self, buf: Array, i: Array, j: Array, rows: Array) -> Array:
        """buf[i[n], j[n]] = rows[n], dropping pairs whose j is past buf's second dim."""

    def count_dropped(self, n: Array) -> None:
        """Adds ``n`` dropped expert assignments to runtime.kernels_moe.DROPPED."""

    def scan(self, body: Callable, carry: tuple, consts: tuple, xs: tuple) -> tuple[tuple, tuple]:
        """Runs body(carry, consts, x_slices) -> (carry, ys) over the leading dim of xs."""

    def float_dtype(self, dtype: str) -> Any: ...

    def cast(self, x: Array, dtype: str) -> Array: ...

    def axis_offset(self, t: TensorType, dim: str) -> Any:
        """Global index of this device's first element along ``dim`` (0 when unsharded)."""

    # Mesh collectives over tuples of axes (major first), as in jax.lax under shard_map.
    def psum(self, x: Array, axes: tuple[str, ...]) -> Array: ...

    def psum_scatter(self, x: Array, axes: tuple[str, ...], axis: int) -> Array: ...

    def all_gather(self, x: Array, axes: tuple[str, ...], axis: int) -> Array: ...

    def all_to_all(self, x: Array, axes: tuple[str, ...], split: int, concat: int) -> Array: ...

    def axis_index(self, axes: tuple[str, ...]) -> Any: ...

    def group_size(self, axes: tuple[str, ...]) -> int: ...

    def dynamic_slice(self, x: Array, axis: int, start: Any, size: int) -> Array: ...


Rule = Callable[[Op, Sequence[Array], Sequence[TensorType], Backend, Any], tuple]
RULES: dict[str, Rule] = {}


def rule(kind: str) -> Callable[[Rule], Rule]:
    def reg(fn: Rule) -> Rule:
        RULES[kind] = fn
        return fn

    return reg


def align(x: Array, names: str, to: str) -> Array:
    """Transposes ``x`` (dims ``names``) to the order of ``to`` and inserts size-1 dims for the
    letters of ``to`` it lacks, so that it broadcasts by name."""
    present = [c for c in to if c in names]
    perm = [names.index(c) for c in present]
    if perm != list(range(len(perm))):
        x = x.transpose(perm)
    shape, i = [], 0
    for c in to:
        if c in names:
            shape.append(x.shape[i])
            i += 1
        else:
            shape.append(1)
    return x.reshape(tuple(shape)) if len(shape) != x.ndim else x


@rule("einsum")
def _einsum(op, xs, ts, be, interp):
    return (be.einsum(op.spec, *xs),)


@rule("unary")
def _unary(op, xs, ts, be, interp):
    xp, (x,) = be.xp, xs
    fn = op.fn
    if fn == "gelu":
        y = 0.5 * x * (1.0 + be.erf(x / xp.sqrt(xp.asarray(2.0, x.dtype))))
    elif fn == "gelu_tanh":
        y = 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif fn == "silu":
        y = x / (1.0 + xp.exp(-x))
    elif fn == "relu":
        y = xp.maximum(x, 0)
    elif fn == "exp":
        y = xp.exp(x)
    elif fn == "tanh":
        y = xp.tanh(x)
    elif fn == "rsqrt":
        y = 1.0 / xp.sqrt(x)
    elif fn == "neg":
        y = -x
    elif fn == "square":
        y = x * x
    elif fn == "sigmoid":
        y = 1.0 / (1.0 + xp.exp(-x))
    else:
        raise ValueError(f"no semantics for unary {fn}")
    return (y,)


@rule("scale")
def _scale(op, xs, ts, be, interp):
    return (xs[0] * be.xp.asarray(op.factor, xs[0].dtype),)


@rule("binary")
def _binary(op, xs, ts, be, interp):
    out = ts[0].names + "".join(c for c in ts[1].names if c not in ts[0].names)
    a = align(xs[0], ts[0].names, out)
    b = align(xs[1], ts[1].names, out)
    xp = be.xp
    f = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
         "max": lambda: xp.maximum(a, b)}[op.fn]
    return (f(),)


@rule("norm")
def _norm(op, xs, ts, be, interp):
    xp = be.xp
    x, scale, *bias = xs
    ax = ts[0].index(op.dim)
    axes = ts[0].dim(op.dim).axes
    n = op.size or ts[0].size(op.dim)  # a zero-padded dim: the real entries only
    pad = ts[0].size(op.dim) - n

    def mean(v):  # over the whole (possibly sharded) dim; padded entries of x are zero
        s = v.sum(axis=ax, keepdims=True)
        return (be.psum(s, axes) if axes else s) / n

    if op.norm == "layernorm":
        mu = mean(x)
        c = x - mu
        var = mean(c * c) - (mu * mu * (pad / n) if pad else 0)  # each zero pad added (0 - mu)^2
        y = c / xp.sqrt(var + op.eps)
    else:
        y = x / xp.sqrt(mean(x * x) + op.eps)
    y = y * align(scale, op.dim, ts[0].names)
    if bias:
        y = y + align(bias[0], op.dim, ts[0].names)
    return (y,)


@rule("softmax")
def _softmax(op, xs, ts, be, interp):
    xp, (x,) = be.xp, xs
    ax = ts[0].index(op.dim)
    m = x.max(axis=ax, keepdims=True)
    e = xp.exp(x - m)
    return (e / e.sum(axis=ax, keepdims=True),)


@rule("rope")
def _rope(op, xs, ts, be, interp):
    xp = be.xp
    x, pos = xs
    names = ts[0].names
    rest = "".join(c for c in names if c not in "BLD")
    order = "BL" + rest + "D"
    xt = align(x, names, order)
    rd, half = op.rotary_dim, op.rotary_dim // 2
    inv = 1.0 / (op.theta ** (xp.arange(0, rd, 2, dtype=xp.float64 if xt.dtype == xp.float64 else xp.float32) / rd))
    ang = pos.astype(inv.dtype)[:, :, None] * inv  # [B, L, rd/2]
    tables = getattr(be, "rope_tables", None)  # the JAX backend computes them once per program
    cos, sin = tables(ang, pos, (op.theta, rd)) if tables else (xp.cos(ang), xp.sin(ang))
    shape = ang.shape[:2] + (1,) * len(rest) + (half,)
    cos, sin = cos.reshape(shape).astype(xt.dtype), sin.reshape(shape).astype(xt.dtype)
    rot, keep = xt[..., :rd], xt[..., rd:]
    if op.style == "half":
        x1, x2 = rot[..., :half], rot[..., half:]
        out = xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = xp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    y = xp.concatenate([out, keep], axis=-1) if rd < xt.shape[-1] else out
    return (align(y, order, names),)


@rule("embed")
def _embed(op, xs, ts, be, interp):
    table, tokens = xs
    v = ts[0].dim("V")
    if not v.axes:
        return (be.xp.take(table, tokens, axis=0),)
    # V-sharded table: each device gathers the rows it holds, zeros elsewhere (a partial sum).
    off = be.axis_offset(ts[0], "V")
    local = tokens - off
    inside = (local >= 0) & (local < table.shape[0])
    rows = be.xp.take(table, be.xp.where(inside, local, 0), axis=0)
    return (rows * inside[..., None].astype(rows.dtype),)


@rule("causal_mask")
def _causal_mask(op, xs, ts, be, interp):
    xp = be.xp
    s, pos = xs
    names = ts[0].names
    t = xp.arange(s.shape[names.index("T")])
    masked = t[None, None, :] > pos[:, :, None]  # [B, L, T]
    if op.window:
        masked = masked | (t[None, None, :] <= pos[:, :, None] - op.window)
    m = align(masked, "BLT", names)
    return (xp.where(m, xp.asarray(-xp.inf, s.dtype), s),)


@rule("cache_update")
def _cache_update(op, xs, ts, be, interp):
    cache, new, pos = xs
    cn, nn = ts[0].names, ts[1].names
    order_c = "BT" + "".join(c for c in cn if c not in "BT")
    order_n = "BL" + "".join(c for c in nn if c not in "BL")
    c = align(cache, cn, order_c)
    n = align(new, nn, order_n)
    write = cache_windows.writer(c)  # a window of a larger (serving) buffer: write into that one
    out = write(n, pos) if write is not None else be.set_rows(c, n, pos)
    return (align(out, order_c, cn),)


@rule("cast")
def _cast(op, xs, ts, be, interp):
    return (be.cast(xs[0], op.dtype),)


@rule("scan")
def _scan(op, xs, ts, be, interp):
    nc, nk = op.carry, op.consts
    fn = interp.module.function(op.body.name)

    def body(carry, consts, x_slices):
        outs = interp.call(fn, (*carry, *consts, *x_slices))
        return tuple(outs[:nc]), tuple(outs[nc:])

    carry, ys = be.scan(body, tuple(xs[:nc]), tuple(xs[nc : nc + nk]), tuple(xs[nc + nk :]))
    return (*carry, *ys)


class Interpreter:
    """Evaluates functions of a module op by op with a Backend."""

    def __init__(self, module, backend: Backend, rules: dict[str, Rule] | None = None):
        self.module, self.be = module, backend
        self.rules = RULES if rules is None else rules

    def call(self, fn, args: Sequence[Array]) -> tuple:
        env: dict[str, Array] = {p.name: a for p, a in zip(fn.params, args)}
        types = fn.value_types
        for op in fn.ops:
            rule_fn = self.rules.get(op.kind)
            if rule_fn is None:
                raise LoweringError(f"op '{op.kind}' has no {type(self.be).__name__} rule")
            args = [env[o] for o in op.operands]
            if op.kind != "scan":  # per-layer lists (JaxBackend split_layers) feed only the layer loop
                args = [self.be.xp.stack(a) if isinstance(a, list) else a for a in args]
            outs = rule_fn(op, args, [types[o] for o in op.operands], self.be, self)
            env.update(zip(op.results, outs))
        return tuple(env[r] for r in fn.returns)


# ---- collectives and layout ops (need a Backend with mesh collectives) ----------------------


@rule("all_gather")
def _all_gather(op, xs, ts, be, interp):
    return (be.all_gather(xs[0], op.axes, ts[0].index(op.dim)),)


@rule("reduce_scatter")
def _reduce_scatter(op, xs, ts, be, interp):
    return (be.psum_scatter(xs[0], op.axes, ts[0].index(op.dim)),)


@rule("all_reduce")
def _all_reduce(op, xs, ts, be, interp):
    return (be.psum(xs[0], op.axes),)


@rule("all_to_all")
def _all_to_all(op, xs, ts, be, interp):
    return (be.all_to_all(xs[0], op.axes, ts[0].index(op.split_dim), ts[0].index(op.concat_dim)),)


@rule("local_slice")
def _local_slice(op, xs, ts, be, interp):
    x = xs[0]
    ax = ts[0].index(op.dim)
    n = be.group_size(op.axes)
    size = x.shape[ax] // n
    start = be.axis_index(op.axes) * size
    return (be.dynamic_slice(x, ax, start, size),)


import runtime.kernels_rewrites  # registers the rules of the rewrite passes' ops
import runtime.kernels_pipeline  # registers ppermute, pipeline
import runtime.kernels_moe  # registers top_k, dispatch, combine
