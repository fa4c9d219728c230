"""Modules and functions: a mesh plus flat SSA functions of ops.

A function is a list of params (each with a role the runtime binds: ``input`` tokens and
positions, ``weight`` tensors, ``cache`` buffers that are donated, or a plain ``arg`` of a
layer body), ops in order, and returned values. Entry functions are what the runtime calls;
the others are bodies applied by ``scan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from ir.errors import Location
from ir.ops import Op
from ir.types import TensorType

ROLES: tuple[str, ...] = ("input", "weight", "cache", "arg")
#: What a weight is, for the rules that treat weights differently (layouts replicate biases and
#: norm scales; random weights start norm scales near 1): "" a matrix or table (or not a
#: weight), ``bias``, ``norm`` (a norm's scale), ``scale`` (int8 per-channel scales). A body
#: param carries the kind of the weight it receives, whatever its role.
KINDS: tuple[str, ...] = ("", "bias", "norm", "scale")

#: The load-time function: checkpoint weights in, the weights the entries take out (packed for
#: fusion, quantized to int8). The runtime calls it once when weights arrive, never per step.
PREPARE = "prepare"


@dataclass(frozen=True)
class Param:
    name: str
    type: TensorType
    role: str = "arg"
    kind: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown param role {self.role!r}; valid: {', '.join(ROLES)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown param kind {self.kind!r}; valid: {', '.join(k for k in KINDS if k)}")


@dataclass(frozen=True)
class Function:
    name: str
    params: tuple[Param, ...]
    ops: tuple[Op, ...]
    returns: tuple[str, ...]
    result_types: tuple[TensorType, ...]
    entry: bool = False
    #: Where the function was parsed from (diagnostics only; not part of its identity).
    loc: Location | None = field(default=None, compare=False, repr=False)

    @cached_property
    def value_types(self) -> dict[str, TensorType]:
        """Every SSA value defined in the function (params and op results) with its type."""
        out = {p.name: p.type for p in self.params}
        for op in self.ops:
            out.update(zip(op.results, op.types))
        return out

    @cached_property
    def producers(self) -> dict[str, int]:
        """Value name -> index of the op that defines it (params are absent)."""
        return {r: i for i, op in enumerate(self.ops) for r in op.results}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def params_with_role(self, role: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.role == role)

    def with_ops(self, ops: tuple[Op, ...] | list[Op], returns: tuple[str, ...] | None = None) -> "Function":
        return replace(self, ops=tuple(ops), returns=self.returns if returns is None else tuple(returns))


@dataclass(frozen=True)
class Module:
    name: str
    mesh: tuple[tuple[str, int], ...]
    functions: tuple[Function, ...]

    @property
    def mesh_sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def n_devices(self) -> int:
        n = 1
        for _, s in self.mesh:
            n *= s
        return n

    def function(self, name: str) -> Function:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(f"no function @{name}")

    def has_function(self, name: str) -> bool:
        return any(f.name == name for f in self.functions)

    @property
    def entries(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if f.entry)

    @property
    def prepare(self) -> Function | None:
        """The load-time weight function, whose results are (in order) every entry's weight
        params; None when the entries take checkpoint weights as they are."""
        return next((f for f in self.functions if f.name == PREPARE), None)

    def raw_weight_params(self) -> tuple[Param, ...]:
        """The weights a checkpoint must supply: @prepare's params, else the entries'."""
        if self.prepare is not None:
            return self.prepare.params
        return self.entries[0].params_with_role("weight") if self.entries else ()

    def with_function(self, fn: Function) -> "Module":
        return replace(self, functions=tuple(fn if f.name == fn.name else f for f in self.functions))

    def with_functions(self, fns: tuple[Function, ...] | list[Function]) -> "Module":
        return replace(self, functions=tuple(fns))


class ModuleContext:
    """The InferContext of a module: mesh sizes and function lookup."""

    def __init__(self, module: Module):
        self.module = module
        self.mesh = module.mesh_sizes

    def function(self, name: str) -> Function:
        from ir.errors import VerifyError

        try:
            return self.module.function(name)
        except KeyError:
            raise VerifyError(f"reference to unknown function @{name}") from None
