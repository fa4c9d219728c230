"""Prefill then decode, the same way for every executor, so their logits can be compared.

Decode is teacher-forced: the continuation tokens are given, not sampled, so two executors
(or einshard and Hugging Face) see the same inputs at every step even where argmax would differ
by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from ir.module import Module
from runtime.reference import run_reference


class Executor(Protocol):
    name: str
    module: Module

    def call(self, entry: str, args: Mapping[str, Any]) -> tuple: ...

    @staticmethod
    def to_host(x: Any) -> np.ndarray: ...


class ReferenceExecutor:
    """The numpy float64 oracle."""

    name = "reference"

    def __init__(self, module: Module, float_type: type = np.float64):
        self.module, self.float_type = module, float_type

    def call(self, entry: str, args: Mapping[str, Any]) -> tuple:
        return run_reference(self.module, entry, args, self.float_type)

    @staticmethod
    def to_host(x: Any) -> np.ndarray:
        return np.asarray(x)


@dataclass(frozen=True)
class Generation:
    """Logits at every position: prompt positions from prefill, then one per decode step."""

    prefill_logits: np.ndarray  # [B, P, V]
    decode_logits: np.ndarray  # [B, S, V]

    @property
    def logits(self) -> np.ndarray:
        return np.concatenate([self.prefill_logits, self.decode_logits], axis=1)


def zero_caches(module: Module, entry: str) -> dict[str, np.ndarray]:
    fn = module.function(entry)
    return {p.name: np.zeros(p.type.shape, np.float32) for p in fn.params_with_role("cache")}


def prepared_weights(ex: Executor, weights: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoint weights -> the entries' weight arguments: fitted to the params (padded heads),
    then, when the module has a load-time ``@prepare`` (packing, int8), run through it once."""
    from runtime.weights import fit_to_params

    m = ex.module
    raw = fit_to_params(weights, m.raw_weight_params())
    if m.prepare is None:
        return raw
    outs = ex.call(m.prepare.name, raw)
    return dict(zip((p.name for p in m.entries[0].params_with_role("weight")), outs))


def generate(ex: Executor, weights: Mapping[str, Any], tokens: np.ndarray, prompt_len: int) -> Generation:
    """Prefills ``tokens[:, :prompt_len]`` and decodes the rest one token per step. A module whose
    batch pad-dims padded takes zero rows after the real ones (runtime/weights.py ``fit_inputs``)
    and returns logits of the true batch."""
    from runtime.weights import fit_inputs

    m = ex.module
    weights = prepared_weights(ex, weights)
    B, total = tokens.shape
    caches: dict[str, Any] = zero_caches(m, "prefill")
    cache_names = [p.name for p in m.function("prefill").params_with_role("cache")]
    pos = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (B, prompt_len))
    pre_params, dec_params = m.function("prefill").params, m.function("decode").params if total > prompt_len else ()
    ins = fit_inputs({"tokens": tokens[:, :prompt_len].astype(np.int32), "pos": pos}, pre_params)
    out = ex.call("prefill", {**weights, **caches, **ins})
    pre = ex.to_host(out[0])
    caches = dict(zip(cache_names, out[1:]))
    steps = []
    for t in range(prompt_len, total):
        pos = np.full((B, 1), t, np.int32)
        ins = fit_inputs({"tokens": tokens[:, t : t + 1].astype(np.int32), "pos": pos}, dec_params)
        out = ex.call("decode", {**weights, **caches, **ins})
        steps.append(ex.to_host(out[0]))
        caches = dict(zip(cache_names, out[1:]))
    V = pre.shape[-1]
    dec = np.concatenate(steps, axis=1) if steps else np.zeros((B, 0, V), pre.dtype)
    return Generation(pre, dec)
