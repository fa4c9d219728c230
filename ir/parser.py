"""Lark parser for the textual IR; every failure is a ParseError with a caret location."""

from __future__ import annotations

import json
import math
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import lark

from ir.errors import Location, ParseError, location_in
from ir.module import Function, Module, Param
from ir.ops import OPS, Op, Symbol
from ir.textfile import read_user_text
from ir.types import Dim, TensorType


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _expected(names: set[str]) -> str:
    pretty = {
        "RBRACE": "'}'", "LBRACE": "'{'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
        "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "VALUE": "a %value", "SYMBOL": "an @symbol",
        "NAME": "a name", "INT": "an integer", "RETURN": "'return'", "FUNC": "'func'", "MORETHAN": "'>'",
        "LESSTHAN": "'<'", "ESCAPED_STRING": "a string", "SIGNED_NUMBER": "a number", "ENTRY": "'entry'",
        "MODULE": "'module'", "PARTIAL": "'partial'", "ROLE": "a role (input, weight, cache)",
        "KIND": "a kind (bias, norm, scale)",
        "__ANON_0": "'->'",
    }
    items = sorted({pretty.get(n, n) for n in names})
    return ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")


class _Builder:
    def __init__(self, text: str, file: str):
        self.text, self.file = text, file

    def loc(self, node: Any, length: int = 1) -> Location:
        meta = node.meta if isinstance(node, lark.Tree) else node
        return location_in(self.text, self.file, meta.line, meta.column, length)

    def err(self, node: Any, msg: str, hint: str | None = None) -> ParseError:
        return ParseError(msg, self.loc(node), hint)

    def int_(self, tok: Any, what: str) -> int:
        if len(str(tok)) > 18:
            raise self.err(tok, f"{what} is too large: {str(tok)[:20]}...")
        return int(tok)

    # ---- pieces ------------------------------------------------------------------------
    def type_(self, t: lark.Tree) -> TensorType:
        dtype_tok, *rest = t.children
        dims_nodes = [c for c in rest if isinstance(c, lark.Tree) and c.data == "dim"]
        partial_nodes = [c for c in rest if isinstance(c, lark.Tree) and c.data == "partial"]
        partial_nodes = [p for p in partial_nodes if p is not None]
        dims = []
        for d in dims_nodes:
            name, size, axes = d.children
            ax = tuple(str(a) for a in axes.children if a is not None) if axes is not None else ()
            try:
                dims.append(Dim(str(name), self.int_(size, f"size of dim {name}"), ax))
            except ValueError as e:
                raise self.err(name, str(e)) from None
        partial = frozenset(str(a) for p in partial_nodes for a in p.children)
        try:
            return TensorType(str(dtype_tok), tuple(dims), partial)
        except ValueError as e:
            raise self.err(dtype_tok, str(e), None) from None

    def value(self, v: lark.Tree) -> Any:
        tok = v.children[0] if v.children else None
        try:
            if v.data == "string":
                return json.loads(str(tok))
            if v.data == "number":
                s = str(tok)
                x = float(s) if any(c in s for c in ".eE") else int(s)
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError("the number is not finite")
                return x
        except ValueError as e:  # includes json.JSONDecodeError and over-long integers
            raise self.err(tok if tok is not None else v, f"bad attribute value: {e}") from None
        if v.data == "true":
            return True
        if v.data == "false":
            return False
        if v.data == "symbol":
            return Symbol(str(v.children[0])[1:])
        return tuple(self.value(c) for c in v.children if c is not None)

    def op(self, node: lark.Tree) -> Op:
        ch: list[Any] = node.children  # tokens, subtrees and None placeholders
        i = 0
        results = []
        while isinstance(ch[i], lark.Token) and ch[i].type == "VALUE":
            results.append(str(ch[i])[1:])
            i += 1
        kind_tok = ch[i]
        i += 1
        cls = OPS.get(str(kind_tok))
        if cls is None:
            from ir.errors import did_you_mean

            raise self.err(kind_tok, f"unknown op '{kind_tok}'", did_you_mean(str(kind_tok), sorted(OPS)))
        operands = []
        while i < len(ch) and (ch[i] is None or (isinstance(ch[i], lark.Token) and ch[i].type == "VALUE")):
            if ch[i] is not None:
                operands.append(str(ch[i])[1:])
            i += 1
        attrs: dict[str, Any] = {}
        types = []
        for c in ch[i:]:
            if isinstance(c, lark.Tree) and c.data == "attrs":
                for a in c.children:
                    if a is None:
                        continue
                    key, val = a.children
                    if str(key) in attrs:
                        raise self.err(key, f"attribute '{key}' given twice")
                    attrs[str(key)] = (key, self.value(val))
            elif isinstance(c, lark.Tree) and c.data == "type":
                types.append(self.type_(c))
        kwargs = self.convert_attrs(cls, attrs, kind_tok)
        loc = self.loc(node)
        lo, hi = cls.arity
        if len(operands) < lo or (hi is not None and len(operands) > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
            raise ParseError(f"{cls.kind} takes {want} operands, got {len(operands)}", loc)
        if len(types) != len(results):
            raise ParseError(f"{len(results)} results but {len(types)} result types", loc)
        return cls(results=tuple(results), operands=tuple(operands), types=tuple(types), loc=loc, **kwargs)

    def convert_attrs(self, cls: type[Op], attrs: dict[str, Any], kind_tok: Any) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        want = {f.name for f in cls.attr_fields()}
        out = {}
        for key, (tok, val) in attrs.items():
            if key not in want:
                from ir.errors import did_you_mean

                raise self.err(tok, f"{cls.kind} has no attribute '{key}'", did_you_mean(key, sorted(want)))
            hint = hints[key]
            ok = True
            if hint is float and isinstance(val, int) and not isinstance(val, bool):
                val = float(val)
            elif hint is float:
                ok = isinstance(val, float)
            elif hint is int:
                ok = isinstance(val, int) and not isinstance(val, bool)
            elif hint is bool:
                ok = isinstance(val, bool)
            elif hint is str:
                ok = isinstance(val, str)
            elif hint is Symbol:
                ok = isinstance(val, Symbol)
            elif typing.get_origin(hint) is tuple:
                (elem, *_) = typing.get_args(hint)
                ok = isinstance(val, tuple) and all(isinstance(x, elem) for x in val)
            if not ok:
                raise self.err(tok, f"attribute '{key}' of {cls.kind} must be {getattr(hint, '__name__', hint)}")
            out[key] = val
        import dataclasses as _dc

        required = {f.name for f in cls.attr_fields()
                    if f.default is _dc.MISSING and f.default_factory is _dc.MISSING}
        missing = required - set(out)
        if missing:
            raise self.err(kind_tok, f"{cls.kind} is missing attributes: {', '.join(sorted(missing))}")
        return out

    def function(self, node: lark.Tree) -> Function:
        entry = node.children[0] is not None
        ch = node.children[1:]
        name = str(ch[0])[1:]
        params, types, ops, ret = [], [], [], None
        for c in ch[1:]:
            if c is None:
                continue
            if c.data == "param":
                role, kind, val, ty = c.children
                params.append(Param(str(val)[1:], self.type_(ty), str(role) if role is not None else "arg",
                                    str(kind) if kind is not None else ""))
            elif c.data == "type":
                types.append(self.type_(c))
            elif c.data == "op":
                ops.append(self.op(c))
            elif c.data == "ret":
                ret = tuple(str(v)[1:] for v in c.children if v is not None)
        line = self.text.split("\n")[node.meta.line - 1] if node.meta.line else ""
        func_loc = self.loc(node, len(line.strip()) or 1)
        return Function(name, tuple(params), tuple(ops), ret or (), tuple(types), entry, loc=func_loc)

    def module(self, node: lark.Tree) -> Module:
        name_tok, mesh, *fns = node.children
        axes: list[tuple[str, int]] = []
        if mesh is not None:
            for ax in mesh.children:
                if ax is None:
                    continue
                a, s = ax.children
                if any(a == b for b, _ in axes):
                    raise self.err(a, f"mesh axis '{a}' given twice")
                size = self.int_(s, f"size of mesh axis '{a}'")
                if size < 1:
                    raise self.err(s, f"mesh axis '{a}' must have a positive size")
                axes.append((str(a), size))
        funcs = [self.function(f) for f in fns]
        seen: set[str] = set()
        for f, node_f in zip(funcs, fns):
            if f.name in seen:
                raise self.err(node_f, f"function @{f.name} defined twice")
            seen.add(f.name)
        return Module(str(name_tok)[1:], tuple(axes), tuple(funcs))


def parse_module(text: str, file: str = "<ir>") -> Module:
    """Parses IR text. Raises ParseError (with location) on any malformed input."""
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        raise ParseError(f"unexpected character {text[e.pos_in_stream or 0]!r}",
                         location_in(text, file, e.line, e.column)) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        what = "end of input" if tok.type == "$END" else repr(str(tok))
        line = getattr(tok, "line", None) or e.line or 1
        col = getattr(tok, "column", None) or e.column or 1
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        raise ParseError(f"unexpected {what}; expected {_expected(set(e.expected))}",
                         location_in(text, file, line, max(1, col), len(str(tok)) if tok.type != "$END" else 1)) from None
    except lark.UnexpectedInput as e:
        raise ParseError(f"malformed input: {e.__class__.__name__}", location_in(text, file, e.line or 1, e.column or 1)) from None
    root: Any = tree.children[0]
    return _Builder(text, file).module(root)


def parse_file(path: str | Path) -> Module:
    return parse_module(read_user_text(path, ParseError, "IR file"), str(path))
