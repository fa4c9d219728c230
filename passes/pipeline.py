"""Pipeline strings: ``pad-heads,shard{ffn=2d-ws,attn=batch},cleanup``.

Parsing checks every pass name and option at once and reports all problems in one PassError
(with a caret under the first). Printing gives the canonical form (non-default options only),
and ``parse(print(p)) == p``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

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


def _split_top(text: str) -> list[tuple[int, str]]:
    """Splits on commas outside braces; returns (offset, piece) pairs."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise PassError("unbalanced '}' in pipeline", Location("<pipeline>", 1, i + 1, text))
        elif c == "," and depth == 0:
            out.append((start, text[start:i]))
            start = i + 1
    if depth:
        raise PassError("unclosed '{' in pipeline", Location("<pipeline>", 1, len(text), text))
    out.append((start, text[start:]))
    return out


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
    text = text.strip()
    if not text:
        return Pipeline(())
    for off, piece in _split_top(text):
        lead = len(piece) - len(piece.lstrip())
        piece_s = piece.strip()
        col = off + lead + 1
        if not piece_s:
            problems.append((col, 1, "empty pass name", None))
            continue
        name, _, rest = piece_s.partition("{")
        name = name.strip()
        cls = registry.get(name)
        if cls is None:
            problems.append((col, len(name), f"unknown pass '{name}'", did_you_mean(name, sorted(registry))))
            continue
        kwargs: dict[str, Any] = {}
        if rest:
            if not rest.endswith("}"):
                problems.append((col, len(piece_s), f"options of '{name}' must end with '}}'", None))
                continue
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
                key, eq, raw = item.partition("=")
                key, raw = key.strip(), raw.strip()
                kcol = col + piece_s.find(item)
                if key in kwargs:
                    problems.append((kcol, len(key), f"option '{key}' of '{name}' given twice", None))
                    continue
                if key not in fields:
                    hint = did_you_mean(key, sorted(fields)) if fields else f"'{name}' takes no options"
                    problems.append((kcol, len(key), f"pass '{name}' has no option '{key}'", hint))
                    continue
                if not eq:
                    problems.append((kcol, len(item), f"option '{key}' of '{name}' needs a value (key=value)", None))
                    continue
                try:
                    kwargs[key] = _convert(cls, key, raw)
                except ValueError as e:
                    problems.append((kcol, len(item), f"bad value for {name}.{key}: {raw!r} ({e})", None))
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
