"""Hints never suggest a setting that is already in force.

A hint is free text written where an error is raised (a pass, the cost model), far from the
settings the user chose. The driver records the settings a spec resolved to (``record``); the CLI
prunes every error's hint against them before showing it (``prune``): each alternative of a hint
("..., or --attn heads") that names a setting with the value already in force is dropped, and a
hint left with nothing to suggest is dropped whole rather than shown stale.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Mapping

#: The settings of the spec being compiled, by name (ffn, attn, kv, weights, overlap, phase).
_IN_FORCE: ContextVar[Mapping[str, str]] = ContextVar("einshard_settings_in_force", default={})

#: A setting named as a flag (``--attn heads``) or a spec key (``serve.kv=pad``); a bare
#: ``kv=auto`` is prose about a default, not a suggestion, and is not matched.
_MENTION = re.compile(r"(?:--|serve\.)(?P<key>ffn|attn|kv|weights|overlap|phase)(?:\s*=\s*|\s+)"
                      r"(?P<value>[a-z0-9][\w-]*)")
_ALTERNATIVE = re.compile(r",\s+or\s+|;\s+(?:or\s+)?|\s+or\s+")


def record(settings: Mapping[str, str]) -> None:
    """Remember the settings in force for the spec now being compiled."""
    _IN_FORCE.set(dict(settings))


def in_force() -> Mapping[str, str]:
    return _IN_FORCE.get()


def _alternatives(hint: str) -> list[str]:
    """``hint`` split at its top-level "or"s and semicolons (not inside parentheses)."""
    out, depth, start = [], 0, 0
    i = 0
    while i < len(hint):
        c = hint[i]
        depth += c in "(["
        depth -= c in ")]"
        m = _ALTERNATIVE.match(hint, i) if depth == 0 else None
        if m and m.end() > i:
            out.append(hint[start:i])
            start = i = m.end()
            continue
        i += 1
    out.append(hint[start:])
    return [a for a in out if a.strip()]


def stale(alternative: str, settings: Mapping[str, str]) -> bool:
    """Whether the alternative suggests a setting whose value is already in force."""
    return any(settings.get(m["key"]) == m["value"] for m in _MENTION.finditer(alternative))


def prune(hint: str | None, settings: Mapping[str, str] | None = None) -> str | None:
    """``hint`` without the alternatives that name a setting already in force (None when no
    alternative is left)."""
    if not hint:
        return hint
    settings = in_force() if settings is None else settings
    if not settings:
        return hint
    parts = _alternatives(hint)
    kept = [p.strip() for p in parts if not stale(p, settings)]
    if len(kept) == len(parts):
        return hint
    return ", or ".join(kept) or None
