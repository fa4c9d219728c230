"""Collective ops and the ``reshard`` placeholder that ``insert-collectives`` expands.

Sharding conventions (as jax.shard_map with tuples of axes): a dim's axes are listed major
first, so gathering a dim sharded over ``{x,y,z}`` over ``(y,z)`` leaves ``{x}`` — gathers take
a *suffix* of the axes, and scatters append axes as the new minor ones.
"""

from __future__ import annotations

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


def _require_dim(op: str, x: TensorType, dim: str) -> None:
    if not x.has(dim):
        raise fail(f"{op} on dim {dim}, but the operand has dims {x.names}")


def _without_minor(op: str, x: TensorType, dim: str, axes: tuple[str, ...]) -> tuple[str, ...]:
    """``dim``'s axes once ``axes`` leave it; they must be its minor (last) axes."""
    _require_dim(op, x, dim)
    have = x.dim(dim).axes
    k = len(axes)
    if k > len(have) or have[len(have) - k:] != axes:
        raise fail(f"{op}{_axes_str(axes)} needs those axes as the minor axes of {dim}, "
                   f"which is sharded over {_axes_str(have)}")
    return have[: len(have) - k]


def _reduced(op: str, x: TensorType, axes: tuple[str, ...]) -> TensorType:
    """``x`` with its partial sums over ``axes`` summed (they must be pending)."""
    if not set(axes) <= x.partial:
        raise fail(f"{op} over {_axes_str(axes)} but the operand is partial over "
                   f"{_axes_str(tuple(sorted(x.partial)))}")
    return TensorType(x.dtype, x.dims, x.partial - set(axes))


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
        return (_set_axes(x, self.dim, _without_minor("all_gather", x, self.dim, self.axes)),)


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
        _require_dim("reduce_scatter", x, self.dim)
        t = _reduced("reduce_scatter", x, self.axes)
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
        return (_reduced("all_reduce", x, self.axes),)


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
        _require_dim("all_to_all", x, self.split_dim)
        if self.split_dim == self.concat_dim:
            raise fail("all_to_all needs two different dims")
        t = _set_axes(x, self.concat_dim, _without_minor("all_to_all", x, self.concat_dim, self.axes))
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
        _require_dim("local_slice", x, self.dim)
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


COLLECTIVE_EINSUM_KINDS = ("all_gather", "reduce_scatter")


@op_kind("collective_einsum")
@dataclass(frozen=True, kw_only=True)
class CollectiveEinsum(Op):
    """A collective fused with the einsum(s) next to it, run as a loop of ppermutes and partial
    einsums so that communication overlaps computation (Wang et al. 2023; the paper's §3.5).

    * ``collective = all_gather``: operand 0 is gathered over ``axes`` along ``dim`` and fed, as
      the *first* term, to every einsum in ``specs``; operands 1.. are the einsums' second
      terms, one per spec. Results: one per spec, equal to ``einsum(all_gather(x), w_i)``.
    * ``collective = reduce_scatter``: one spec over operands 0 and 1; the result equals
      ``reduce_scatter(einsum(a, b), axes, dim)``.

    ``bidirectional`` sends half of each chunk each way around the ring (both links busy)."""

    collective: str
    axes: tuple[str, ...]
    dim: str
    specs: tuple[str, ...]
    bidirectional: bool = False
    #: Why the collective exists (the rule that asked for it), for the ledger.
    reason: str = ""
    arity = (2, None)
    is_collective = True

    def parts(self, ins: tuple[TensorType, ...], ctx) -> tuple[tuple[TensorType, ...], tuple[TensorType, ...]]:
        """(the collective's input and output types, the einsums' result types)."""
        from ir.ops import Einsum

        if self.collective not in COLLECTIVE_EINSUM_KINDS:
            raise fail(f"collective_einsum: unknown collective {self.collective!r}; "
                       f"valid: {', '.join(COLLECTIVE_EINSUM_KINDS)}")
        if not self.specs:
            raise fail("collective_einsum needs at least one einsum spec")
        if self.collective == "all_gather":
            if len(ins) != 1 + len(self.specs):
                raise fail(f"collective_einsum all_gather with {len(self.specs)} specs takes "
                           f"{1 + len(self.specs)} operands, got {len(ins)}")
            g = AllGather(results=(), operands=(), types=(), axes=self.axes, dim=self.dim).infer((ins[0],), ctx)[0]
            outs = tuple(Einsum(results=(), operands=(), types=(), spec=s).infer((g, w), ctx)[0]
                         for s, w in zip(self.specs, ins[1:]))
            return (ins[0], g), outs
        if len(self.specs) != 1 or len(ins) != 2:
            raise fail("collective_einsum reduce_scatter takes one spec and two operands")
        y = Einsum(results=(), operands=(), types=(), spec=self.specs[0]).infer(ins, ctx)[0]
        r = ReduceScatter(results=(), operands=(), types=(), axes=self.axes, dim=self.dim).infer((y,), ctx)[0]
        return (y, r), (r,)

    def infer(self, ins, ctx):
        _check_axes("collective_einsum", self.axes, ctx.mesh)
        return self.parts(ins, ctx)[1]
