"""Perplexity of a token sequence: prefill with every position's logits, in windows.

A text longer than one window is cut into consecutive, non-overlapping windows; each is a fresh
prefill (positions 0..W-1) and predicts its own tokens 1..W-1 from the ones before. This is the
protocol a reference must follow to agree (tests compare with transformers on the same windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ir.module import Module
from runtime.generate import prepared_weights, zero_caches
from runtime.lower_jax import JaxExecutor


@dataclass(frozen=True)
class Score:
    total_nll: float  # nats, summed over scored tokens
    count: int  # tokens scored (each window's first token is context only)
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.count


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive windows of at most ``size`` tokens; a last window of one
    token would score nothing (it has no token to predict from), so it is dropped."""
    out = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < 2:
        out.pop()
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_tokens(build: Callable[[int], Module], weights: Mapping[str, np.ndarray], ids: Sequence[int],
                 window: int) -> Score:
    """Mean NLL of ``ids`` under the model; ``build(L)`` gives the prefill module of length L
    with ``logits = all``. One compiled program per distinct window length (at most two)."""
    executors: dict[int, tuple[JaxExecutor, dict]] = {}

    def logits_of(toks: np.ndarray) -> np.ndarray:
        L = toks.shape[1]
        if L not in executors:
            ex = JaxExecutor(build(L))
            executors[L] = (ex, prepared_weights(ex, weights))
        ex, w = executors[L]
        pos = np.arange(L, dtype=np.int32)[None, :]
        out = ex.call("prefill", {**w, **zero_caches(ex.module, "prefill"), "tokens": toks, "pos": pos})
        return ex.to_host(out[0])[0]

    return score_with(logits_of, ids, window)


def score_with(logits_of: Callable[[np.ndarray], np.ndarray], ids: Sequence[int], window: int) -> Score:
    """Mean NLL of ``ids`` given ``logits_of(tokens[1, L]) -> [L, V]`` (every position's logits
    of a fresh prefill at positions 0..L-1), over :func:`windows`; shared by the resident and
    the offloaded (runtime/offload.py, runtime/offload_host.py) scorers."""
    total, count = 0.0, 0
    spans = windows(len(ids), window)
    for s, e in spans:
        L = e - s
        toks = np.asarray(ids[s:e], np.int32)[None, :]
        lp = log_softmax(logits_of(toks)[:-1])
        total -= float(lp[np.arange(L - 1), toks[0, 1:]].sum())
        count += L - 1
    return Score(total, count, len(spans))
