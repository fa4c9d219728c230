"""The verifier: SSA, operand counts, re-inferred types and sharding legality.

It re-runs every op's inference rule and compares with the annotated types, so a pass that
builds a wrong op is caught right after it runs. Diagnostics point at the op: its source line
when the module was parsed, or its line in the printed module otherwise.
"""

from __future__ import annotations

import math

from ir.errors import Location, VerifyError
from ir.module import Function, Module, ModuleContext
from ir.ops import Op, Scan
from ir.printer import format_type, module_lines
from ir.types import TensorType


class _Locator:
    """Finds a location for an op lazily (printing the module only when an error happens)."""

    def __init__(self, module: Module, file: str):
        self.module, self.file = module, file
        self._lines: tuple[list[str], dict] | None = None

    def __call__(self, fn: Function, index: int | None) -> Location:
        if index is not None and fn.ops[index].loc is not None:
            return fn.ops[index].loc  # type: ignore[return-value]
        if index is None and fn.loc is not None:
            return fn.loc
        if self._lines is None:
            self._lines = module_lines(self.module)
        lines, where = self._lines
        if index is None:
            line = next((i + 1 for i, s in enumerate(lines) if f"func @{fn.name}(" in s), 1)
        else:
            line = where[(fn.name, index)]
        src = lines[line - 1]
        col = len(src) - len(src.lstrip()) + 1
        return Location(self.file, line, col, src, len(src.strip()))


def check_type_on_mesh(t: TensorType, mesh: dict[str, int]) -> None:
    """Axes must exist in the mesh and every sharded dim must divide by its axes' product."""
    for a in t.mesh_axes:
        if a not in mesh:
            raise VerifyError(f"type {format_type(t)} uses mesh axis '{a}', which the mesh "
                              f"({', '.join(mesh) or 'one device'}) does not have")
    for d in t.dims:
        n = math.prod(mesh[a] for a in d.axes)
        if d.size % n:
            raise VerifyError(f"dim {d.name}={d.size} does not divide over {{{','.join(d.axes)}}} ({n} devices)")


def verify_function(fn: Function, ctx: ModuleContext, locate: _Locator) -> None:
    defined: dict[str, TensorType] = {}
    for p in fn.params:
        if p.name in defined:
            raise VerifyError(f"parameter %{p.name} of @{fn.name} declared twice", locate(fn, None))
        try:
            check_type_on_mesh(p.type, ctx.mesh)
        except VerifyError as e:
            raise VerifyError(f"parameter %{p.name}: {e.message}", locate(fn, None)) from None
        defined[p.name] = p.type
    for i, op in enumerate(fn.ops):
        try:
            verify_op(op, defined, ctx)
        except VerifyError as e:
            raise VerifyError(e.message, locate(fn, i), e.hint) from None
        for r, t in zip(op.results, op.types):
            if r in defined:
                raise VerifyError(f"value %{r} defined twice", locate(fn, i))
            defined[r] = t
    for r in fn.returns:
        if r not in defined:
            raise VerifyError(f"@{fn.name} returns undefined value %{r}", locate(fn, None))
    got = tuple(defined[r] for r in fn.returns)
    if got != fn.result_types:
        raise VerifyError(
            f"@{fn.name} declares results ({', '.join(map(format_type, fn.result_types))}) but returns "
            f"({', '.join(map(format_type, got))})", locate(fn, None))


def verify_op(op: Op, defined: dict[str, TensorType], ctx: ModuleContext) -> None:
    lo, hi = op.arity
    if len(op.operands) < lo or (hi is not None and len(op.operands) > hi):
        raise VerifyError(f"{op.kind} takes {lo}..{hi if hi is not None else 'n'} operands, got {len(op.operands)}")
    for o in op.operands:
        if o not in defined:
            raise VerifyError(f"use of undefined value %{o}")
    ins = tuple(defined[o] for o in op.operands)
    inferred = op.infer(ins, ctx)
    if len(inferred) != len(op.results):
        raise VerifyError(f"{op.kind} produces {len(inferred)} results but names {len(op.results)}")
    for r, want, got in zip(op.results, inferred, op.types):
        if want != got:
            raise VerifyError(f"%{r} is annotated {format_type(got)} but {op.kind} gives {format_type(want)}")
        check_type_on_mesh(got, ctx.mesh)


def _check_scan_graph(m: Module, locate: _Locator) -> None:
    """Scan bodies must exist, not be entries, and not (transitively) scan themselves."""
    import networkx as nx

    g = nx.DiGraph()
    for fn in m.functions:
        g.add_node(fn.name)
        for i, op in enumerate(fn.ops):
            if isinstance(op, Scan):
                if not m.has_function(op.body.name):
                    raise VerifyError(f"scan body @{op.body.name} is not defined", locate(fn, i))
                if m.function(op.body.name).entry:
                    raise VerifyError(f"scan body @{op.body.name} is an entry function", locate(fn, i))
                g.add_edge(fn.name, op.body.name)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    first = m.function(cycle[0][0])
    raise VerifyError("functions call each other in a cycle: " + " -> ".join(f"@{a}" for a, _ in cycle)
                      + f" -> @{cycle[0][0]}", locate(first, None))


def verify(m: Module, file: str = "<ir>") -> None:
    """Raises VerifyError (with the offending op's location) if the module is ill-formed."""
    locate = _Locator(m, file)
    names = [f.name for f in m.functions]
    if len(set(names)) != len(names):
        raise VerifyError(f"function names repeat: {names}")
    _check_scan_graph(m, locate)
    ctx = ModuleContext(m)
    for fn in m.functions:
        verify_function(fn, ctx, locate)
    _check_prepare(m, locate)


def _check_prepare(m: Module, locate: _Locator) -> None:
    """@prepare runs at load time: weights in, and out exactly what each entry's weight params are."""
    prep = m.prepare
    if prep is None:
        return
    if prep.entry:
        raise VerifyError("@prepare runs once at weight-load time; it cannot be an entry", locate(prep, None))
    for p in prep.params:
        if p.role != "weight":
            raise VerifyError(f"@prepare takes checkpoint weights only; %{p.name} is {p.role}", locate(prep, None))
    for e in m.entries:
        want = tuple(p.type for p in e.params_with_role("weight"))
        if want != prep.result_types:
            raise VerifyError(
                f"@prepare returns ({', '.join(map(format_type, prep.result_types))}) but @{e.name} takes "
                f"weights ({', '.join(map(format_type, want))})", locate(e, None))
