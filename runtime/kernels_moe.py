"""Semantics of the mixture-of-experts ops (ir/moe_ops.py) for every backend.

``dispatch`` ranks each (token, choice) among the assignments to its expert with a cumulative
count over an int one-hot of the *indices* ([R*T, X] integers, no float work), then writes each
token row into its expert's slot with one scatter; ``combine`` gathers the rows back by the same
indices. Both work on the local token group, so the sharded programs need no other rule.
"""

from __future__ import annotations

import threading

from runtime.kernels import rule


@rule("top_k")
def _top_k(op, xs, ts, be, interp):
    (x,) = xs
    ax = ts[0].index(op.dim)
    xp = be.xp
    moved = xp.moveaxis(x, ax, -1)
    vals, idx = be.top_k(moved, op.k)
    return xp.moveaxis(vals, -1, ax), xp.moveaxis(idx.astype(xp.int32), -1, ax)


def local_capacity(op, t_h, be) -> int:
    """Slots per expert in this device's token group (C is sharded like the tokens)."""
    axes = t_h.dim("B").axes + t_h.dim("L").axes
    return op.capacity // be.group_size(axes) if axes else op.capacity


class DropCounter:
    """Assignments dropped by capacity-limited dispatches since the last ``take`` (summed over
    devices, layers and steps): the run reports it, so a capacity never drops silently."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def add(self, n: object) -> None:
        with self.lock:
            self.n += int(n)  # type: ignore[call-overload]

    def take(self, sync: bool = False) -> int:
        """The count so far, reset; ``sync`` waits for JAX's pending host callbacks first."""
        if sync:
            import jax

            jax.effects_barrier()
        with self.lock:
            n, self.n = self.n, 0
        return n


DROPPED = DropCounter()


@rule("dispatch")
def _dispatch(op, xs, ts, be, interp):
    xp = be.xp
    h, idx = xs
    b, l, e = h.shape
    r = idx.shape[2]
    cap = local_capacity(op, ts[0], be)
    per_row = cap // b  # the slots of each (local part of a) sequence
    order = xp.transpose(idx, (0, 2, 1)).reshape(b, r * l)  # per row, r-major: first choices first
    onehot = (order[..., None] == xp.arange(op.experts, dtype=order.dtype)).astype(xp.int32)
    rank = xp.take_along_axis(xp.cumsum(onehot, axis=1) - 1, order[..., None].astype(xp.int32), axis=2)[..., 0]
    kept = rank < per_row
    slot = xp.where(kept, xp.arange(b, dtype=xp.int32)[:, None] * per_row + rank, cap).astype(xp.int32)
    rows = xp.broadcast_to(h[:, None], (b, r, l, e)).reshape(b * r * l, e)
    buf = be.scatter_rows(xp.zeros((op.experts, cap, e), h.dtype), order.reshape(-1), slot.reshape(-1), rows)
    if op.capacity < ts[0].size("B") * ts[0].size("L"):  # drops are possible: count them
        n = (~kept).sum()
        tok = set(ts[0].dim("B").axes + ts[0].dim("L").axes)
        replicas = tuple(a for a in be.mesh if a not in tok)
        if replicas:  # the devices holding the same tokens drop the same assignments: count one
            n = xp.where(be.axis_index(replicas) == 0, n, 0)
        be.count_dropped(n)
    return buf, xp.transpose(slot.reshape(b, r, l), (0, 2, 1))


@rule("combine")
def _combine(op, xs, ts, be, interp):
    xp = be.xp
    y, idx, slot, w = xs
    cap = y.shape[1]
    keep = slot < cap
    if ts[0].dim("X").axes:  # this device holds experts off .. off + X_local: the rest add zero
        local = idx - be.axis_offset(ts[0], "X")
        keep = keep & (local >= 0) & (local < y.shape[0])
        idx = xp.where(keep, local, 0)
    rows = y[idx, xp.where(keep, slot, 0)]  # [B, L, R, E]
    wk = w * keep.astype(w.dtype)
    return ((rows * wk[..., None].astype(rows.dtype)).sum(axis=2),)
