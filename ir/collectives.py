"""Collective ops and the ``reshard`` placeholder that ``insert-collectives`` expands.

Sharding conventions (as jax.shard_map with tuples of axes): a dim's axes are listed major
first, so gathering a dim sharded over ``{x,y,z}`` over ``(y,z)`` leaves ``{x}`` — gathers take
a *suffix* of the axes, and scatters append axes as the new minor ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir.ops import Op, fail, op_kind
from ir.types import Dim, TensorType


def _axes_str(axes: tuple[str, ...]) -> str:
    return "{" + ",".join(axes) + "}"


def _check_axes(op: str, axes: tuple[str, ...], mesh: dict[str, int]) -> None:
    if not axes:
        raise fail(f"{op} needs at least one mesh axis")
    if len(set(axes)) != len(axes):
        raise fail(f"{op} lists a mesh axis twice: {_axes_str(axes)}")
    for a in axes:
        if a not in mesh:
            raise fail(f"{op} uses mesh axis '{a}', which the mesh ({', '.join(mesh) or 'one device'}) lacks")


def _set_axes(t: TensorType, name: str, axes: tuple[str, ...]) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, d.size, axes) if d.name == name else d for d in t.dims), t.partial)


def group_size(axes: tuple[str, ...], mesh: dict[str, int]) -> int:
    return math.prod(mesh[a] for a in axes)


@op_kind("all_gather")
@dataclass(frozen=True, kw_only=True)
class AllGather(Op):
    """Concatenates the shards of ``dim`` over ``axes`` (a suffix of the dim's axes)."""

    axes: tuple[str, ...]
    dim: str
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (1, 1)
    is_collective = True

    def infer(self, ins, ctx):
        (x,) = ins
        _check_axes("all_gather", self.axes, ctx.mesh)
        if not x.has(self.dim):
            raise fail(f"all_gather over dim {self.dim}, but the operand has dims {x.names}")
        have = x.dim(self.dim).axes
        k = len(self.axes)
        if have[len(have) - k:] != self.axes or k > len(have):
            raise fail(f"all_gather{_axes_str(self.axes)} needs those axes as the minor axes of {self.dim}, "
                       f"which is sharded over {_axes_str(have)}")
        return (_set_axes(x, self.dim, have[: len(have) - k]),)


@op_kind("reduce_scatter")
@dataclass(frozen=True, kw_only=True)
class ReduceScatter(Op):
    """Sums the partial sums over ``axes`` and leaves ``dim`` sharded over them (as minor axes)."""

    axes: tuple[str, ...]
    dim: str
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (1, 1)
    is_collective = True

    def infer(self, ins, ctx):
        (x,) = ins
        _check_axes("reduce_scatter", self.axes, ctx.mesh)
        if not set(self.axes) <= x.partial:
            raise fail(f"reduce_scatter over {_axes_str(self.axes)} but the operand is partial over "
                       f"{_axes_str(tuple(sorted(x.partial)))}")
        if not x.has(self.dim):
            raise fail(f"reduce_scatter onto dim {self.dim}, but the operand has dims {x.names}")
        t = TensorType(x.dtype, x.dims, x.partial - set(self.axes))
        return (_set_axes(t, self.dim, x.dim(self.dim).axes + self.axes),)


@op_kind("all_reduce")
@dataclass(frozen=True, kw_only=True)
class AllReduce(Op):
    """Sums the partial sums over ``axes``; the result is replicated over them."""

    axes: tuple[str, ...]
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (1, 1)
    is_collective = True

    def infer(self, ins, ctx):
        (x,) = ins
        _check_axes("all_reduce", self.axes, ctx.mesh)
        if not set(self.axes) <= x.partial:
            raise fail(f"all_reduce over {_axes_str(self.axes)} but the operand is partial over "
                       f"{_axes_str(tuple(sorted(x.partial)))}")
        return (TensorType(x.dtype, x.dims, x.partial - set(self.axes)),)


@op_kind("all_to_all")
@dataclass(frozen=True, kw_only=True)
class AllToAll(Op):
    """Moves ``axes`` from the minor end of ``concat_dim`` to the minor end of ``split_dim``."""

    axes: tuple[str, ...]
    split_dim: str
    concat_dim: str
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (1, 1)
    is_collective = True

    def infer(self, ins, ctx):
        (x,) = ins
        _check_axes("all_to_all", self.axes, ctx.mesh)
        for d in (self.split_dim, self.concat_dim):
            if not x.has(d):
                raise fail(f"all_to_all over dim {d}, but the operand has dims {x.names}")
        if self.split_dim == self.concat_dim:
            raise fail("all_to_all needs two different dims")
        have = x.dim(self.concat_dim).axes
        k = len(self.axes)
        if k > len(have) or have[len(have) - k:] != self.axes:
            raise fail(f"all_to_all moves {_axes_str(self.axes)}, which must be the minor axes of "
                       f"{self.concat_dim} (sharded over {_axes_str(have)})")
        t = _set_axes(x, self.concat_dim, have[: len(have) - k])
        return (_set_axes(t, self.split_dim, x.dim(self.split_dim).axes + self.axes),)


@op_kind("local_slice")
@dataclass(frozen=True, kw_only=True)
class LocalSlice(Op):
    """Keeps this device's block of a dim that is replicated over ``axes`` (no communication)."""

    axes: tuple[str, ...]
    dim: str
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        _check_axes("local_slice", self.axes, ctx.mesh)
        if not x.has(self.dim):
            raise fail(f"local_slice of dim {self.dim}, but the operand has dims {x.names}")
        if set(self.axes) & x.mesh_axes:
            raise fail(f"local_slice over {_axes_str(self.axes)}: the operand already varies over some of them")
        return (_set_axes(x, self.dim, x.dim(self.dim).axes + self.axes),)


@op_kind("reshard")
@dataclass(frozen=True, kw_only=True)
class Reshard(Op):
    """The same logical tensor in another layout; ``insert-collectives`` picks the collectives.

    ``reason`` records which rule asked for it, for the collective ledger.
    """

    reason: str
    arity = (1, 1)

    def infer(self, ins, ctx):
        (x,) = ins
        target = self.types[0] if self.types else x
        if target.unsharded() != x.unsharded():
            raise fail(f"reshard changes the logical tensor: {x} vs {target}")
        if target.partial - x.partial:
            raise fail("reshard cannot create partial sums")
        return (target,)
