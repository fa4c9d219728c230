"""Scheduling policy, free of JAX and of time: which waiting requests to admit, in which
prefill shape, and how wide the decode window is. The engine executes what this decides.

Shapes come from a few buckets (powers of two) so a new prompt length or arrival count
reuses a compiled program instead of compiling a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from runtime.serving.request import Request


@dataclass(frozen=True)
class SchedulerConfig:
    """``policy``: ``fused`` (temporal fusion: admit whenever a slot is free) or ``static``
    (FasterTransformer-style dynamic batching: wait for ``slots`` requests or ``static_timeout``,
    then run the batch until its longest member ends). ``compact``: Flover's compaction (else
    finished rows are masked in place). ``chunk``: Dynamic SplitFuse (0 = off): the token budget
    of one fused forward per device, its decode rows plus a prompt chunk of the rest; prompts
    longer than it are prefilled chunk by chunk inside the decode step's program instead of by
    an admission prefill. ``step_tokens``: the token budget of one admission prefill.
    ``max_queue``: waiting requests beyond it are refused (HTTP 503)."""

    slots: int = 8
    policy: str = "fused"
    compact: bool = True
    chunk: int = 0
    step_tokens: int = 2048
    max_queue: int = 256
    static_timeout: float = 0.05
    min_bucket: int = 8

    def __post_init__(self) -> None:
        if self.policy not in ("fused", "static"):
            raise ValueError(f"unknown scheduler policy {self.policy!r} (fused | static)")
        if self.chunk and self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk {self.chunk} must be a power of two")
        if self.slots < 1 or self.max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def prompt_bucket(n: int, cache_len: int, min_bucket: int) -> int:
    """The prefill length for a prompt of ``n`` tokens: a power of two, at most the context."""
    return min(cache_len, pow2_at_least(max(n, min_bucket)))


def batch_bucket(n: int, valid: Callable[[int], bool], limit: int) -> int:
    """The smallest power of two >= n that the layout can shard (rows beyond n are padding)."""
    b = pow2_at_least(n)
    while b <= limit:
        if valid(b):
            return b
        b *= 2
    raise ValueError(f"no batch size between {n} and {limit} is valid for this layout")


def admitted_length(req: Request, cfg: SchedulerConfig) -> int:
    """Prompt tokens the admission prefill covers: all, or none for a prompt longer than the
    chunk budget (its chunks run inside the fused forwards that follow)."""
    n = len(req.prompt)
    return 0 if cfg.chunk and n > cfg.chunk else n


def choose_admissions(waiting: Sequence[Request], free: int, live: int, waited: float,
                      cfg: SchedulerConfig, cache_len: int) -> int:
    """How many requests from the head of ``waiting`` (FIFO) to prefill now.

    ``waited`` is how long the oldest has waited (for ``static``)."""
    if not waiting or free == 0:
        return 0
    if cfg.policy == "static":
        if live or (len(waiting) < cfg.slots and waited < cfg.static_timeout):
            return 0
        return min(cfg.slots, len(waiting), free)
    n, longest = 0, 0
    for req in waiting[:free]:
        longest = max(longest, admitted_length(req, cfg))
        cost = pow2_at_least(n + 1) * prompt_bucket(longest, cache_len, cfg.min_bucket)
        if n and cost > cfg.step_tokens:
            break
        n += 1
    return n


def chunk_length(width: int, cfg: SchedulerConfig) -> int:
    """Dynamic SplitFuse: the prompt chunk one forward takes beside a decode window of ``width``
    rows per device (0 when none decode): what the chunk budget leaves, so the forward's tokens
    are the same every iteration and there is one chunk program per window width."""
    if not cfg.chunk:
        return 0
    if width >= cfg.chunk:
        raise ValueError(f"a chunk budget of {cfg.chunk} tokens leaves no room for a prompt chunk beside "
                         f"{width} decode rows per device (use a budget above the slots per device)")
    return cfg.chunk - width
