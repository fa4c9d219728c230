"""Layout ops that fusion needs: flatten/unflatten dims, and concat/split along one dim.

A fused weight packs several segments (the query, the FFN input, ...) along one dim ``P``. When
``P`` is later sharded over n devices, each device must hold a piece of *every* segment, so the
packing is interleaved: the segments are cut into ``groups`` chunks and ``P`` stores chunk 0 of
every segment, then chunk 1 of every segment, and so on (Megatron packs fused QKV the same way).
Any sharding of ``P`` over a number of devices that divides ``groups`` then leaves each device
with whole chunks of each segment, so concat and split are local on every device and the same
rule serves the unsharded reference and every sharded program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir.ops import Op, check_partials_disjoint, fail, make_type, merge_dims, op_kind
from ir.types import Dim


def _letter(op: str, c: str) -> None:
    if len(c) != 1 or not c.isalpha() or not c.isupper():
        raise fail(f"{op}: dim names are single upper-case letters, got {c!r}")


def local_groups(groups: int, axes: tuple[str, ...], mesh: dict[str, int]) -> int:
    """Interleave groups held by one device when the packed dim is sharded over ``axes``."""
    n = math.prod(mesh[a] for a in axes)
    if groups % n:
        raise fail(f"a packed dim of {groups} interleave groups cannot be sharded over "
                   f"{{{','.join(axes)}}} ({n} devices): {n} must divide {groups}")
    return groups // n


@op_kind("flatten")
@dataclass(frozen=True, kw_only=True)
class Flatten(Op):
    """Merges ``dims`` (in that order, major first) into one dim ``into`` at the first's place.

    Only the first (major) of the merged dims may be sharded: its blocks stay contiguous."""

    dims: str
    into: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        _letter("flatten", self.into)
        if len(self.dims) < 2 or any(not x.has(c) for c in self.dims):
            raise fail(f"flatten needs at least two dims of the operand ({x.names}), got {self.dims!r}")
        if self.into in x.names and self.into not in self.dims:
            raise fail(f"flatten into {self.into}: the operand already has that dim")
        for c in self.dims[1:]:
            if x.dim(c).axes:
                raise fail(f"flatten {self.dims}: only the major dim {self.dims[0]} may be sharded, "
                           f"but {c} is sharded over {{{','.join(x.dim(c).axes)}}}")
        size = math.prod(x.size(c) for c in self.dims)
        dims = []
        for d in x.dims:
            if d.name == self.dims[0]:
                dims.append(Dim(self.into, size, d.axes))
            elif d.name not in self.dims:
                dims.append(d)
        return (make_type("flatten", x.dtype, dims, x.partial),)


@op_kind("unflatten")
@dataclass(frozen=True, kw_only=True)
class Unflatten(Op):
    """Splits ``dim`` into the dims ``into`` of ``sizes`` (major first); its sharding goes to
    the first of them."""

    dim: str
    into: str
    sizes: tuple[int, ...]
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        if not x.has(self.dim):
            raise fail(f"unflatten {self.dim}, but the operand has dims {x.names}")
        if len(self.into) != len(self.sizes) or len(self.into) < 2:
            raise fail(f"unflatten into {self.into!r} needs one size per dim, got {list(self.sizes)}")
        for c in self.into:
            _letter("unflatten", c)
            if c in x.names and c != self.dim:
                raise fail(f"unflatten into {self.into}: the operand already has dim {c}")
        if math.prod(self.sizes) != x.size(self.dim):
            raise fail(f"unflatten {self.dim}={x.size(self.dim)} into sizes {list(self.sizes)} "
                       f"(product {math.prod(self.sizes)})")
        dims = []
        for d in x.dims:
            if d.name == self.dim:
                dims.append(Dim(self.into[0], self.sizes[0], d.axes))
                dims += [Dim(c, s) for c, s in zip(self.into[1:], self.sizes[1:])]
            else:
                dims.append(d)
        return (make_type("unflatten", x.dtype, dims, x.partial),)


@op_kind("concat")
@dataclass(frozen=True, kw_only=True)
class Concat(Op):
    """Packs operand i's dim ``dims[i]`` into dim ``into``, interleaved in ``groups`` chunks.

    The operands' other dims must agree (names, order, sizes, sharding); the packed dims must be
    sharded alike, over a number of devices that divides ``groups``."""

    dims: str
    into: str
    groups: int
    arity = (1, None)

    def infer(self, ins, ctx):
        _letter("concat", self.into)
        if len(self.dims) != len(ins):
            raise fail(f"concat names {len(self.dims)} packed dims ({self.dims!r}) for {len(ins)} operands")
        if self.groups < 1:
            raise fail(f"concat groups must be >= 1, got {self.groups}")
        rests, axes = [], set()
        for i, (c, t) in enumerate(zip(self.dims, ins)):
            if not t.has(c):
                raise fail(f"concat operand {i} has dims {t.names}, no {c}")
            if t.size(c) % self.groups:
                raise fail(f"concat operand {i}: {c}={t.size(c)} does not split into {self.groups} groups")
            axes.add(t.dim(c).axes)
            rests.append(t.drop(c))
        if len(axes) != 1:
            raise fail(f"concat: the packed dims are sharded differently: {sorted(axes)}")
        (ax,) = axes
        local_groups(self.groups, ax, ctx.mesh)
        order = {tuple(d.name for d in r.dims) for r in rests}
        if len(order) != 1 or len({t.index(c) for c, t in zip(self.dims, ins)}) != 1:
            raise fail("concat operands must have the same other dims in the same order")
        merge_dims("concat", *rests)
        partial = check_partials_disjoint("concat", ins)
        if any(t.partial != ins[0].partial for t in ins):
            raise fail("concat: operands must be partial sums over the same axes")
        if self.into in rests[0].names:
            raise fail(f"concat into {self.into}: the operands already have that dim")
        dtypes = {t.dtype for t in ins}
        if len(dtypes) != 1:
            raise fail(f"concat operands have different dtypes: {sorted(dtypes)}")
        size = sum(t.size(c) for c, t in zip(self.dims, ins))
        first = ins[0]
        dims = [Dim(self.into, size, ax) if d.name == self.dims[0] else d for d in first.dims]
        return (make_type("concat", first.dtype, dims, partial),)


@op_kind("split")
@dataclass(frozen=True, kw_only=True)
class Split(Op):
    """Unpacks dim ``dim`` (packed by ``concat`` with ``groups``) into segments of ``sizes``;
    result i calls its segment ``names[i]``. Linear: partial sums pass through."""

    dim: str
    names: str
    sizes: tuple[int, ...]
    groups: int
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        if not x.has(self.dim):
            raise fail(f"split {self.dim}, but the operand has dims {x.names}")
        if len(self.names) != len(self.sizes) or not self.sizes:
            raise fail(f"split names {self.names!r} and sizes {list(self.sizes)} must pair up")
        if sum(self.sizes) != x.size(self.dim):
            raise fail(f"split {self.dim}={x.size(self.dim)} into sizes summing to {sum(self.sizes)}")
        if self.groups < 1 or any(s % self.groups for s in self.sizes):
            raise fail(f"split: every segment size {list(self.sizes)} must divide into {self.groups} groups")
        ax = x.dim(self.dim).axes
        local_groups(self.groups, ax, ctx.mesh)
        outs = []
        for c, s in zip(self.names, self.sizes):
            _letter("split", c)
            if c != self.dim and c in x.names:
                raise fail(f"split segment name {c} clashes with another dim of {x.names}")
            dims = [Dim(c, s, ax) if d.name == self.dim else d for d in x.dims]
            outs.append(make_type("split", x.dtype, dims, x.partial))
        return tuple(outs)

