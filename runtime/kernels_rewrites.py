"""Semantics of the ops the rewrite passes introduce: packing, int8 weights, collective einsums.

Written once over the Backend of runtime/kernels.py, like the other rules, so the numpy
reference, the SPMD simulator and the JAX lowering agree by construction. Every rule works on
local blocks: the packed-dim rules read the number of interleave groups a device holds from the
dim's sharding, the int8 rules take a max across devices when a reduced dim is sharded, and the
collective einsum runs its ring loop with the backend's ``ppermute`` and ``fori_loop``.
"""

from __future__ import annotations

import math

import numpy as np

from ir.types import TensorType
from runtime.kernels import align, rule


def _n(be, axes: tuple[str, ...]) -> int:
    return be.group_size(axes) if axes else 1


def _groups(be, groups: int, t: TensorType, dim: str) -> int:
    return groups // _n(be, t.dim(dim).axes)


def _split_axis(x, ax: int, parts: tuple[int, ...]):
    """x reshaped so axis ``ax`` becomes ``parts`` (row-major)."""
    return x.reshape(x.shape[:ax] + tuple(parts) + x.shape[ax + 1:])


def _merge_axes(x, ax: int, k: int):
    """Axes ``ax .. ax+k-1`` of x merged into one."""
    return x.reshape(x.shape[:ax] + (math.prod(x.shape[ax:ax + k]),) + x.shape[ax + k:])


def _take(x, ax: int, start: int, size: int):
    idx = [slice(None)] * x.ndim
    idx[ax] = slice(start, start + size)
    return x[tuple(idx)]


# ---- packing --------------------------------------------------------------------------------


@rule("flatten")
def _flatten(op, xs, ts, be, interp):
    (x,), names = xs, ts[0].names
    first = names.index(op.dims[0])
    rest = [c for c in names if c not in op.dims]
    order = rest[:first] + list(op.dims) + rest[first:]
    perm = [names.index(c) for c in order]
    if perm != list(range(len(perm))):
        x = x.transpose(perm)
    return (_merge_axes(x, first, len(op.dims)),)


@rule("unflatten")
def _unflatten(op, xs, ts, be, interp):
    (x,), ax = xs, ts[0].index(op.dim)
    tail = math.prod(op.sizes[1:])
    return (_split_axis(x, ax, (x.shape[ax] // tail, *op.sizes[1:])),)


@rule("concat")
def _concat(op, xs, ts, be, interp):
    ax = ts[0].index(op.dims[0])
    g = _groups(be, op.groups, ts[0], op.dims[0])
    parts = [_split_axis(x, ax, (g, x.shape[ax] // g)) for x in xs]
    return (_merge_axes(be.xp.concatenate(parts, axis=ax + 1), ax, 2),)


@rule("split")
def _split(op, xs, ts, be, interp):
    (x,), ax = xs, ts[0].index(op.dim)
    g = _groups(be, op.groups, ts[0], op.dim)
    y = _split_axis(x, ax, (g, x.shape[ax] // g))
    outs, off = [], 0
    for s in op.sizes:
        c = s // op.groups
        outs.append(_merge_axes(_take(y, ax + 1, off, c), ax, 2))
        off += c
    return tuple(outs)


# ---- int8 weights ---------------------------------------------------------------------------


def _segment_index(be, op, t: TensorType):
    """For a segmented scale: the segment of every local row of the packed dim."""
    g = _groups(be, op.groups, t, op.reduce)
    per_group = np.repeat(np.arange(len(op.segments)), [s // op.groups for s in op.segments])
    return be.xp.asarray(np.tile(per_group, g))  # static: the layout fixes it


def _expand_scale(be, op, scale, s_names: str, t: TensorType):
    """Scales broadcast to the weight's local shape (dims in the weight's order)."""
    if op.segments:
        ax = s_names.index("S")
        scale = be.xp.take(scale, _segment_index(be, op, t), axis=ax)
        s_names = s_names.replace("S", op.reduce)
    return align(scale, s_names, t.names)


@rule("quantize")
def _quantize(op, xs, ts, be, interp):
    xp, (w,), t = be.xp, xs, ts[0]
    w = be.cast(w, "f32") if w.dtype != be.float_dtype("f32") else w
    a = xp.abs(w)
    axes = tuple(a_ for c in op.reduce for a_ in t.dim(c).axes)
    if op.segments:
        ax = t.index(op.reduce)
        g = _groups(be, op.groups, t, op.reduce)
        y = _split_axis(a, ax, (g, a.shape[ax] // g))
        segs, off = [], 0
        for s in op.segments:
            c = s // op.groups
            segs.append(_take(y, ax + 1, off, c).max(axis=(ax, ax + 1)))
            off += c
        amax = xp.stack(segs, axis=ax)
        s_names = t.names.replace(op.reduce, "S")
    else:
        amax = a.max(axis=tuple(t.index(c) for c in op.reduce))
        s_names = "".join(c for c in t.names if c not in op.reduce)
    if axes:
        amax = be.pmax(amax, axes)
    scale = amax / 127.0
    scale = xp.where(scale == 0, xp.ones_like(scale), scale)
    q = xp.clip(xp.round(w / _expand_scale(be, op, scale, s_names, t)), -127, 127)
    return (be.cast(q, "i8"), scale)


@rule("dequantize")
def _dequantize(op, xs, ts, be, interp):
    q, scale = xs
    w = be.cast(q, op.dtype)
    return (w * be.cast(_expand_scale(be, op, scale, ts[1].names, ts[0]), op.dtype),)


# ---- collective einsums ---------------------------------------------------------------------


def _slice_dim(be, x, t: TensorType, dim: str, start, size: int):
    return be.dynamic_slice(x, t.index(dim), start, size) if t.has(dim) else x


@rule("collective_einsum")
def _collective_einsum(op, xs, ts, be, interp):
    if op.collective == "all_gather":
        return _ag_einsum(op, xs, ts, be)
    return _einsum_rs(op, xs, ts, be)


def _ag_einsum(op, xs, ts, be):
    """Each device starts with its own chunk of x and passes chunks around the ring; at every
    step it contracts the chunk it holds with the matching slice of each stationary operand."""
    xp = be.xp
    x, ws = xs[0], xs[1:]
    tx, tws = ts[0], ts[1:]
    n, me = be.group_size(op.axes), be.axis_index(op.axes)
    d = op.dim
    ax = tx.index(d)
    c = x.shape[ax]
    outs_names = [s.split("->")[1] for s in op.specs]
    halves = 2 if op.bidirectional else 1
    h = c // halves

    def contrib(outs, chunk, owner, half):
        start = owner * c + half * h
        new = []
        for spec, w, tw, out, on in zip(op.specs, ws, tws, outs, outs_names):
            y = be.einsum(spec, chunk, _slice_dim(be, w, tw, d, start, h))
            if d in on:
                new.append(be.dynamic_update_slice(out, y, on.index(d), start))
            else:
                new.append(out + y)
        return new

    def first(chunk, owner, half):
        outs = []
        for spec, w, tw, on in zip(op.specs, ws, tws, outs_names):
            y = be.einsum(spec, chunk, _slice_dim(be, w, tw, d, owner * c + half * h, h))
            if d in on:
                shape = list(y.shape)
                shape[on.index(d)] = c * n  # the gathered extent
                y = be.dynamic_update_slice(xp.zeros(tuple(shape), y.dtype), y, on.index(d), owner * c + half * h)
            outs.append(y)
        return outs

    parts = [be.dynamic_slice(x, ax, k * h, h) for k in range(halves)]
    outs = first(parts[0], me, 0)
    for k in range(1, halves):
        outs = contrib(outs, parts[k], me, k)

    def step(s, state):
        chunks, outs = state
        chunks = [be.ppermute(chunks[0], op.axes, 1)] + [be.ppermute(ch, op.axes, -1) for ch in chunks[1:]]
        outs = contrib(outs, chunks[0], (me - s) % n, 0)
        for k in range(1, halves):
            outs = contrib(outs, chunks[k], (me + s) % n, k)
        return chunks, outs

    _, outs = be.fori_loop(1, n, step, (parts, outs))
    return tuple(outs)


def _einsum_rs(op, xs, ts, be):
    """Each device computes, step by step, its contribution to the block that is travelling
    towards its owner, adds it to the accumulator it received, and passes it on; after n - 1
    hops every device holds the full sum of its own block."""
    (a, b), (ta, tb) = xs, ts
    n, me = be.group_size(op.axes), be.axis_index(op.axes)
    d = op.dim
    spec = op.specs[0]
    src = ta if ta.has(d) else tb
    full = (a if ta.has(d) else b).shape[src.index(d)]
    blk = full // n
    halves = 2 if op.bidirectional else 1
    h = blk // halves

    def part(block, half):
        start = block * blk + half * h
        return be.einsum(spec, _slice_dim(be, a, ta, d, start, h), _slice_dim(be, b, tb, d, start, h))

    accs = [part((me - 1) % n, 0)] + [part((me + 1) % n, k) for k in range(1, halves)]

    def step(s, accs):
        out = [be.ppermute(accs[0], op.axes, 1) + part((me - s - 1) % n, 0)]
        for k in range(1, halves):
            out.append(be.ppermute(accs[k], op.axes, -1) + part((me + s + 1) % n, k))
        return out

    accs = be.fori_loop(1, n, step, accs)
    if halves == 1:
        return (accs[0],)
    out_ax = spec.split("->")[1].index(d)
    return (be.xp.concatenate(accs, axis=out_ax),)

