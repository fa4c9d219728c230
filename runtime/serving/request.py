"""What a client asks the engine for, and what the engine hands back per iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    """One sequence to continue. ``stop_ids`` are the token ids that end it (the tokenizer's
    end-of-sequence ids; empty under ``ignore_eos``); a stop token is emitted, then the request
    finishes. Stop *strings* are text and are the HTTP layer's job (it aborts the request)."""

    id: str
    prompt: tuple[int, ...]
    sampling: "SamplingParams"
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Event:
    """One iteration's news for one request: a new token, and/or the end of it.

    ``finish`` is ``stop`` (a stop token), ``length`` (max_new_tokens), ``abort`` (the client
    went away) or ``error`` (its step raised; ``error`` says why)."""

    request_id: str
    token: int | None = None
    finish: str | None = None
    error: str | None = None
