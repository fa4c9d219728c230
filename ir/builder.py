"""A small helper for emitting SSA functions: infers each op's type and picks unique names."""

from __future__ import annotations

from typing import Any

from ir.errors import VerifyError
from ir.module import Function, Param
from ir.ops import InferContext, Op
from ir.types import TensorType


class Namer:
    """Deterministic unique names from hints: ``x``, ``x.1``, ``x.2`` ..."""

    def __init__(self, taken: set[str] | None = None):
        self.taken: set[str] = set(taken or ())

    def fresh(self, hint: str) -> str:
        base = hint.split(".")[0] if hint else "v"
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}.{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}.{i}")
        return f"{base}.{i}"


class FunctionBuilder:
    """Emits ops with inferred types; ``finish`` returns the frozen Function."""

    def __init__(self, name: str, ctx: InferContext, entry: bool = False):
        self.name, self.ctx, self.entry = name, ctx, entry
        self.params: list[Param] = []
        self.ops: list[Op] = []
        self.types: dict[str, TensorType] = {}
        self.namer = Namer()

    @classmethod
    def over(cls, fn: Function, ctx: InferContext) -> FunctionBuilder:
        """A builder that knows ``fn``'s params and values (types known, names taken) but holds
        none of its ops: a pass emits the rewritten ops into it."""
        b = cls(fn.name, ctx, fn.entry)
        b.params = list(fn.params)
        b.types = dict(fn.value_types)
        b.namer = Namer(set(b.types))
        return b

    def append(self, op: Op, hint: str = "v") -> tuple[str, ...]:
        """Adds an existing op with its types re-inferred; it keeps its result names, or gets a
        fresh one when it has none. Returns the result names."""
        try:
            types = op.infer(tuple(self.types[o] for o in op.operands), self.ctx)
        except VerifyError as e:
            raise VerifyError(f"rewriting @{self.name}: {e.message}") from None
        names = op.results if op.results else tuple(self.namer.fresh(hint) for _ in types)
        self.namer.taken.update(names)
        self.ops.append(op.with_(results=names, types=types))
        self.types.update(zip(names, types))
        return names

    def param(self, name: str, t: TensorType, role: str = "arg", kind: str = "") -> str:
        if name in self.types:
            raise ValueError(f"duplicate parameter {name}")
        self.namer.taken.add(name)
        self.params.append(Param(name, t, role, kind))
        self.types[name] = t
        return name

    def emit(self, cls: type[Op], operands: list[str] | tuple[str, ...], hint: str | list[str], **attrs: Any) -> Any:
        """Adds an op; returns its result name (or a tuple of names for multi-result ops)."""
        ins = tuple(self.types[o] for o in operands)
        probe = cls(results=(), operands=tuple(operands), types=(), **attrs)
        try:
            types = probe.infer(ins, self.ctx)
        except VerifyError as e:
            raise VerifyError(f"building @{self.name}: {e.message}") from None
        hints = [hint] * len(types) if isinstance(hint, str) else list(hint)
        names = tuple(self.namer.fresh(h) for h in hints)
        self.ops.append(cls(results=names, operands=tuple(operands), types=types, **attrs))
        self.types.update(zip(names, types))
        return names[0] if len(names) == 1 and isinstance(hint, str) else names

    def finish(self, returns: list[str] | tuple[str, ...]) -> Function:
        return Function(self.name, tuple(self.params), tuple(self.ops), tuple(returns),
                        tuple(self.types[r] for r in returns), self.entry)


class BuildContext:
    """InferContext while a module is being assembled (functions added as they are finished)."""

    def __init__(self, mesh: dict[str, int]):
        self.mesh = mesh
        self.functions: dict[str, Function] = {}

    def function(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise VerifyError(f"reference to unknown function @{name}") from None

    def add(self, fn: Function) -> None:
        self.functions[fn.name] = fn
