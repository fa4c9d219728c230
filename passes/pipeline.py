"""Pipeline strings: ``pad-heads,shard{ffn=2d-ws,attn=batch},cleanup``.

The grammar is passes/pipeline.lark (lark, like specs and IR); parsing then checks every pass
name and option at once and reports all problems in one PassError (with a caret under the
first). Printing gives the canonical form (non-default options only),
and ``parse(print(p)) == p``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import lark

from ir.errors import Location, PassError, did_you_mean
from passes.base import Pass
from passes.registry import all_passes


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...]

    def __str__(self) -> str:
        return format_pipeline(self)

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_pass(p: Pass) -> str:
    opts = p.non_default_options()
    if not opts:
        return p.name
    return p.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + "}"


def format_pipeline(p: Pipeline) -> str:
    return ",".join(format_pass(x) for x in p.passes)


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = Path(__file__).with_name("pipeline.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_TOKEN_WORDS = {"COMMA": "','", "LBRACE": "'{'", "RBRACE": "'}'", "EQUAL": "'='", "$END": "end of pipeline"}


def _syntax_error(e: lark.UnexpectedInput, text: str) -> PassError:
    """A PassError for lark's syntax error, in the words of pipelines rather than of the grammar."""
    exp = set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())
    tok = getattr(e, "token", None)
    pos = getattr(e, "pos_in_stream", None)
    if tok is not None and tok.type != "$END":
        pos, found, length = tok.start_pos, tok.type, len(str(tok))
    elif isinstance(e, lark.UnexpectedCharacters) and pos is not None and pos < len(text):
        found, length = {",": "COMMA", "{": "LBRACE", "}": "RBRACE", "=": "EQUAL"}.get(text[pos], "CHAR"), 1
    else:
        pos, found, length = len(text.rstrip()), "$END", 1
    pos = min(pos or 0, max(len(text) - 1, 0))
    depth = text[:pos].count("{") - text[:pos].count("}")
    if found == "RBRACE" and depth <= 0:
        msg = "unbalanced '}' in pipeline"
    elif found == "$END" and "RBRACE" in exp:
        msg = "unclosed '{' in pipeline"
    elif found in ("COMMA", "$END", "RBRACE") and exp <= {"WORD", "RBRACE"}:
        msg = "empty option" if depth > 0 else "empty pass name"
    elif found == "WORD":
        msg = f"unexpected '{tok}'; expected {' or '.join(_TOKEN_WORDS.get(t, t) for t in sorted(exp))}"
    else:
        what = _TOKEN_WORDS.get(found, f"character '{text[pos]}'" if pos < len(text) else "input")
        msg = f"unexpected {what}; expected {' or '.join(_TOKEN_WORDS.get(t, 'a name or value') for t in sorted(exp))}"
    return PassError(msg, Location("<pipeline>", 1, pos + 1, text, max(1, length)))


def _tree(text: str) -> lark.Tree[lark.Token]:
    try:
        return _parser().parse(text)
    except lark.UnexpectedInput as e:
        raise _syntax_error(e, text) from None


def _convert(cls: type[Pass], key: str, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    hint = hints[key]
    if hint is bool:
        if raw not in ("true", "false"):
            raise ValueError("expected true or false")
        return raw == "true"
    if hint is int:
        if not raw.lstrip("-").isdigit():
            raise ValueError("expected an integer")
        return int(raw)
    if hint is float:
        return float(raw)
    return raw


def parse_pipeline(text: str) -> Pipeline:
    """Parses a pipeline string; unknown passes and options are all reported together."""
    registry = all_passes()
    problems: list[tuple[int, int, str, str | None]] = []  # (col, length, message, hint)
    passes: list[Pass] = []
    nodes: list[Any] = _tree(text).children  # pass_ subtrees (lark types children loosely)
    for node in nodes:
        if node is None:
            continue
        name_tok, opts = node.children
        name, col = str(name_tok), name_tok.column or 1
        cls = registry.get(name)
        if cls is None:
            problems.append((col, len(name), f"unknown pass '{name}'", did_you_mean(name, sorted(registry))))
            continue
        kwargs, bad = _options(cls, name, opts.children if opts is not None else [], problems)
        if bad:
            continue
        try:
            passes.append(cls(**kwargs))
        except (PassError, ValueError) as e:
            problems.append((col, len(name), f"bad options for '{name}': {getattr(e, 'message', e)}", None))
    if problems:
        col, length, msg, hint = problems[0]
        more = [p[2] for p in problems[1:]]
        message = msg + ("".join(f"; {m}" for m in more) if more else "")
        raise PassError(message, Location("<pipeline>", 1, col, text, length), hint)
    return Pipeline(tuple(passes))


def _options(cls: type[Pass], name: str, nodes: list[Any], problems: list) -> tuple[dict[str, Any], bool]:
    """The typed keyword arguments of one pass; problems are appended, and flagged by the bool."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    bad = False
    for node in nodes:
        if node is None:
            continue
        key_tok, raw_tok = node.children
        key, kcol = str(key_tok), key_tok.column or 1
        span = (raw_tok.end_pos if raw_tok is not None else key_tok.end_pos) - key_tok.start_pos
        problem: tuple[int, int, str, str | None] | None = None
        if key in kwargs:
            problem = (kcol, len(key), f"option '{key}' of '{name}' given twice", None)
        elif key not in fields:
            hint = did_you_mean(key, sorted(fields)) if fields else f"'{name}' takes no options"
            problem = (kcol, len(key), f"pass '{name}' has no option '{key}'", hint)
        elif raw_tok is None:
            problem = (kcol, len(key), f"option '{key}' of '{name}' needs a value (key=value)", None)
        else:
            try:
                kwargs[key] = _convert(cls, key, str(raw_tok))
            except ValueError as e:
                problem = (kcol, span, f"bad value for {name}.{key}: {str(raw_tok)!r} ({e})", None)
        if problem is not None:
            problems.append(problem)
            bad = True
    return kwargs, bad
