"""Mixture-of-experts ops: ``top_k`` routing, ``dispatch`` of tokens into expert buffers, ``combine``.

Tokens reach their experts by index, not by a one-hot einsum (a measured 2-6x slower on CPU):
``dispatch`` writes each token's row into a static ``[X, C, E]`` buffer (X experts, C slots per
expert) at the slot its rank among the expert's tokens gives it, and ``combine`` reads the rows
back and sums them with the router weights. The experts in between are ordinary einsums with
an X dim, so expert parallelism (X sharded) and expert slicing (F sharded) are plain layouts.

Slots are assigned per sequence: row b of the batch owns slots [b*c, (b+1)*c) of every expert
(c = C / B), and within a row the first choices of every token are placed before the second
choices (r-major), so when c is smaller than the row's tokens the weakest assignments are the
ones dropped, whatever the layout. C is sharded like the tokens (B's axes, and L's for a
dropless dispatch, where a device's part of a row gets the slots of its positions), so an
all-to-all from C to X is exactly expert parallelism's token exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.ops import Op, fail, make_type, merge_dims, op_kind, promote, require_int, require_not_partial
from ir.types import Dim, TensorType


def token_axes(t: TensorType) -> tuple[str, ...]:
    """The mesh axes the tokens of ``t`` (its B then L dims) are spread over: C's axes."""
    return t.dim("B").axes + t.dim("L").axes


def _tokens(op: str, t: TensorType, tail: str) -> None:
    if t.names != "BL" + tail:
        raise fail(f"{op}: expected dims BL{tail}, got {t.names}")


@op_kind("top_k")
@dataclass(frozen=True, kw_only=True)
class TopK(Op):
    """The ``k`` largest entries along ``dim`` (descending; ties to the lower index): their values
    and their indices (i32), both with ``dim`` replaced by ``into`` of size k."""

    k: int
    dim: str
    into: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        if not x.has(self.dim):
            raise fail(f"top_k over {self.dim}, but the operand has dims {x.names}")
        if x.has(self.into):
            raise fail(f"top_k into {self.into}: the operand already has that dim")
        if not 1 <= self.k <= x.size(self.dim):
            raise fail(f"top_k: k={self.k} must be in [1, {x.size(self.dim)}]")
        require_not_partial("top_k", x)
        if x.dim(self.dim).axes:
            raise fail(f"top_k needs {self.dim} whole on every device; all-gather it first")
        promote(x.dtype)
        dims = tuple(Dim(self.into, self.k) if d.name == self.dim else d for d in x.dims)
        return (make_type("top_k", x.dtype, dims), make_type("top_k", "i32", dims))


@op_kind("dispatch")
@dataclass(frozen=True, kw_only=True)
class Dispatch(Op):
    """Scatters token rows ``h[B, L, E]`` to their experts ``idx[B, L, R]``: the buffer
    ``[X=experts, C=capacity, E]`` (empty slots zero) and each assignment's slot ``[B, L, R]`` (i32;
    ``>=`` the group's capacity when the assignment was dropped)."""

    experts: int
    capacity: int
    arity = (2, 2)

    def infer(self, ins, ctx):
        h, idx = ins
        _tokens("dispatch", h, "E")
        _tokens("dispatch", idx, "R")
        require_int("dispatch", idx, "expert indices")
        require_not_partial("dispatch", h)
        require_not_partial("dispatch", idx)
        merge_dims("dispatch", h.drop("E"), idx.drop("R"))
        if idx.dim("R").axes:
            raise fail("dispatch: the route dim R must be whole")
        if self.experts < 1 or self.capacity < 1:
            raise fail(f"dispatch: experts ({self.experts}) and capacity ({self.capacity}) must be positive")
        b, l = h.size("B"), h.size("L")
        if self.capacity % b or self.capacity > b * l:
            raise fail(f"dispatch: capacity {self.capacity} must be batch ({b}) x the slots of one sequence "
                       f"(at most its {l} tokens)")
        if h.dim("L").axes and self.capacity != b * l:
            raise fail("dispatch: a capacity below the tokens is per sequence; L must be whole")
        c = Dim("C", self.capacity, token_axes(h))
        buf = make_type("dispatch", h.dtype, (Dim("X", self.experts), c, h.dim("E")))
        return (buf, idx)


@op_kind("combine")
@dataclass(frozen=True, kw_only=True)
class Combine(Op):
    """``out[b, l, E] = sum_r w[b, l, r] * y[idx[b, l, r], slot[b, l, r], E]`` (dropped slots give
    zero). Linear in ``y``: a partial sum stays one. With X sharded (tokens replicated over the
    expert axes, e.g. one decode token), each device sums its own experts' rows: a partial sum
    over X's axes, reduced like any other (the [B, L, E] result is X/k times smaller than the
    buffer an all-gather would move)."""

    arity = (4, 4)

    def infer(self, ins, ctx):
        y, idx, slot, w = ins
        if y.names != "XCE":
            raise fail(f"combine: expert outputs must be [X, C, E], got {y.names}")
        for t, what in ((idx, "expert indices"), (slot, "slots")):
            _tokens("combine", t, "R")
            require_int("combine", t, what)
        _tokens("combine", w, "R")
        require_not_partial("combine", w, "router weights")
        merge_dims("combine", idx, slot, w)
        if y.dim("C").axes != token_axes(idx):
            raise fail(f"combine: C is sharded over {{{','.join(y.dim('C').axes)}}} but the tokens over "
                       f"{{{','.join(token_axes(idx))}}}; they must agree")
        dims = (idx.dim("B"), idx.dim("L"), y.dim("E"))
        partial = y.partial | frozenset(y.dim("X").axes)
        return (make_type("combine", promote(y.dtype, w.dtype), dims, partial),)
