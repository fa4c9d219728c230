"""Text form of the IR. ``parse(print(m))`` reproduces ``m`` and printing is a fixed point.

Example::

    module @tiny mesh<x=2, y=2> {
      entry func @prefill(
          input %tokens: i32[B=8, L=16],
          weight %embed: f32[V=128, E=64{x,y}]
      ) -> (f32[B=8, L=16, V=128]) {
        %x = embed(%embed, %tokens) : f32[B=8, L=16, E=64{x,y}]
        ...
        return %logits
      }
    }
"""

from __future__ import annotations

import json
from typing import Any

from ir.module import Function, Module
from ir.ops import Op, Symbol
from ir.types import TensorType


def format_type(t: TensorType) -> str:
    dims = ", ".join(f"{d.name}={d.size}" + ("{" + ",".join(d.axes) + "}" if d.axes else "") for d in t.dims)
    s = f"{t.dtype}[{dims}]"
    if t.partial:
        s += " partial{" + ",".join(sorted(t.partial)) + "}"
    return s


def format_attr(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Symbol):
        return "@" + v.name
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"attribute value {v!r} is not finite and has no text form")
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r}")


def format_op(op: Op) -> str:
    lhs = ", ".join("%" + r for r in op.results)
    args = ", ".join("%" + o for o in op.operands)
    defaults = {f.name: f.default for f in op.attr_fields() if f.metadata.get("omit_default")}
    attrs = {k: v for k, v in op.attrs().items() if not (k in defaults and v == defaults[k])}
    attr_s = (" {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in attrs.items()) + "}") if attrs else ""
    types = ", ".join(format_type(t) for t in op.types)
    return f"{lhs} = {op.kind}({args}){attr_s} : {types}"


def function_lines(fn: Function, indent: str = "  ") -> tuple[list[str], dict[int, int]]:
    """The function's lines and, for each op index, its line offset within them."""
    head = ("entry " if fn.entry else "") + f"func @{fn.name}("
    lines = [indent + head]
    for i, p in enumerate(fn.params):
        role = ("" if p.role == "arg" else p.role + " ") + (p.kind + " " if p.kind else "")
        comma = "," if i + 1 < len(fn.params) else ""
        lines.append(f"{indent}    {role}%{p.name}: {format_type(p.type)}{comma}")
    results = ", ".join(format_type(t) for t in fn.result_types)
    lines.append(f"{indent}) -> ({results}) {{")
    where: dict[int, int] = {}
    for i, op in enumerate(fn.ops):
        where[i] = len(lines)
        lines.append(f"{indent}  {format_op(op)}")
    rets = ", ".join("%" + r for r in fn.returns)
    lines.append(f"{indent}  return {rets}".rstrip())
    lines.append(indent + "}")
    return lines, where


def module_lines(m: Module) -> tuple[list[str], dict[tuple[str, int], int]]:
    """All lines of the module and a map (function, op index) -> 1-based line number."""
    mesh = " mesh<" + ", ".join(f"{a}={s}" for a, s in m.mesh) + ">" if m.mesh else ""
    lines = [f"module @{m.name}{mesh} {{"]
    where: dict[tuple[str, int], int] = {}
    for fn in m.functions:
        fl, fw = function_lines(fn)
        base = len(lines)
        for i, off in fw.items():
            where[(fn.name, i)] = base + off + 1
        lines.extend(fl)
    lines.append("}")
    return lines, where


def print_module(m: Module) -> str:
    return "\n".join(module_lines(m)[0]) + "\n"


def print_function(fn: Function) -> str:
    return "\n".join(function_lines(fn, indent="")[0]) + "\n"
