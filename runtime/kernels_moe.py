"""Semantics of the mixture-of-experts ops (ir/moe_ops.py) for every backend.

``dispatch`` ranks each (token, choice) among the assignments to its expert with a cumulative
count over an int one-hot of the *indices* ([R*T, X] integers, no float work), then writes each
token row into its expert's slot with one scatter; ``combine`` gathers the rows back by the same
indices. Both work on the local token group, so the sharded programs need no other rule.
"""

from __future__ import annotations

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


@rule("dispatch")
def _dispatch(op, xs, ts, be, interp):
    xp = be.xp
    h, idx = xs
    b, l, e = h.shape
    r = idx.shape[2]
    t = b * l
    cap = local_capacity(op, ts[0], be)
    flat = idx.reshape(t, r).T.reshape(-1)  # r-major: every token's first choice before any second
    onehot = (flat[:, None] == xp.arange(op.experts, dtype=flat.dtype)[None, :]).astype(xp.int32)
    rank = xp.cumsum(onehot, axis=0) - 1
    slot_flat = xp.take_along_axis(rank, flat[:, None].astype(xp.int32), axis=1)[:, 0].astype(xp.int32)
    rows = xp.tile(h.reshape(t, e), (r, 1))
    buf = be.scatter_rows(xp.zeros((op.experts, cap, e), h.dtype), flat, slot_flat, rows)
    return buf, slot_flat.reshape(r, t).T.reshape(b, l, r)


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
