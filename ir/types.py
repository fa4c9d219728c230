"""Tensor types: dtype, named dims with sizes and mesh sharding, and partial-sum axes.

A type is the whole truth about a value on the mesh: ``f32[B=8, L=1, E=256{x,y,z}] partial{x}``
is a logical [8, 1, 256] tensor whose E dim is split over mesh axes x, y, z (major first) and
whose local blocks are still partial sums over x. Types are frozen and validate what they can
without a mesh; divisibility by axis sizes is checked by the verifier, which knows the mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

DTYPES: tuple[str, ...] = ("f64", "f32", "bf16", "f16", "i32", "i8", "bool")
FLOAT_DTYPES = frozenset({"f64", "f32", "bf16", "f16"})
DTYPE_BYTES: Mapping[str, int] = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i8": 1, "bool": 1}


@dataclass(frozen=True)
class Dim:
    """One named dimension: its letter, logical size and the mesh axes it is split over."""

    name: str
    size: int
    axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.isalpha() or not self.name.isupper() or len(self.name) != 1:
            raise ValueError(f"dim name must be one upper-case letter, got {self.name!r}")
        if self.size < 1:
            raise ValueError(f"dim {self.name} must have a positive size, got {self.size}")
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"dim {self.name} uses a mesh axis twice: {self.axes}")


@dataclass(frozen=True)
class TensorType:
    """dtype + ordered named dims (each possibly sharded) + axes over which it is a partial sum."""

    dtype: str
    dims: tuple[Dim, ...]
    partial: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        names = [d.name for d in self.dims]
        if len(set(names)) != len(names):
            raise ValueError(f"repeated dim name in {''.join(names)}")
        used = [a for d in self.dims for a in d.axes]
        if len(set(used)) != len(used):
            raise ValueError(f"a mesh axis shards two dims: {used}")
        if set(used) & set(self.partial):
            raise ValueError(f"partial-sum axes {sorted(self.partial)} overlap sharded axes {used}")
        if not isinstance(self.partial, frozenset):
            object.__setattr__(self, "partial", frozenset(self.partial))

    # ---- queries -------------------------------------------------------------------------
    @property
    def names(self) -> str:
        """The dim letters in order, e.g. ``"BLE"`` — the einsum subscript of this value."""
        return "".join(d.name for d in self.dims)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    @property
    def rank(self) -> int:
        return len(self.dims)

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"no dim {name} in {self.names}")

    def has(self, name: str) -> bool:
        return any(d.name == name for d in self.dims)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def size(self, name: str) -> int:
        return self.dim(name).size

    @property
    def sharding(self) -> dict[str, tuple[str, ...]]:
        """dim name -> axes, for the sharded dims only."""
        return {d.name: d.axes for d in self.dims if d.axes}

    @property
    def mesh_axes(self) -> frozenset[str]:
        """Every mesh axis that this value's layout mentions (sharded or partial)."""
        return frozenset(a for d in self.dims for a in d.axes) | self.partial

    def local_shape(self, mesh: Mapping[str, int]) -> tuple[int, ...]:
        """Per-device block shape on a mesh of the given axis sizes."""
        return tuple(d.size // math.prod(mesh[a] for a in d.axes) for d in self.dims)

    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    def local_nbytes(self, mesh: Mapping[str, int]) -> int:
        return math.prod(self.local_shape(mesh)) * DTYPE_BYTES[self.dtype]

    # ---- derived types -------------------------------------------------------------------
    def with_dtype(self, dtype: str) -> "TensorType":
        return replace(self, dtype=dtype)

    def unsharded(self) -> "TensorType":
        """The same logical tensor with no sharding and no pending partial sums."""
        return TensorType(self.dtype, tuple(Dim(d.name, d.size) for d in self.dims))

    def with_axes(self, name: str, axes: Iterable[str]) -> "TensorType":
        dims = tuple(Dim(d.name, d.size, tuple(axes)) if d.name == name else d for d in self.dims)
        return replace(self, dims=dims)

    def with_partial(self, partial: Iterable[str]) -> "TensorType":
        return replace(self, partial=frozenset(partial))

    def drop(self, names: str) -> "TensorType":
        """Removes the named dims (used by scans over the layer dim and by reductions)."""
        return replace(self, dims=tuple(d for d in self.dims if d.name not in names))

    def __str__(self) -> str:
        from ir.printer import format_type

        return format_type(self)


def tensor(dtype: str, spec: str | Iterable[tuple[str, int]], **sizes: int) -> TensorType:
    """Shorthand: ``tensor("f32", "BLE", B=2, L=8, E=64)`` or with ``[("B", 2), ...]``."""
    if isinstance(spec, str):
        dims = tuple(Dim(n, sizes[n]) for n in spec)
    else:
        dims = tuple(Dim(n, s) for n, s in spec)
    return TensorType(dtype, dims)
