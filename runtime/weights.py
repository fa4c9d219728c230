"""Random weights with activations of order one, and rounding to the served weight format.

Random weights stand in for a checkpoint in ``einshard run``: matrices get std 1/sqrt(fan_in)
(fan_in = the dims they contract), norm scales 1 ± 0.1, biases ± 0.1, the embedding N(0, 1), so
that logits neither vanish nor blow up and errors are comparable across models.
"""

from __future__ import annotations

import math
from typing import Mapping

import ml_dtypes
import numpy as np

from ir.module import Function
from ir.types import TensorType


def fan_in(name: str, t: TensorType) -> int:
    dims = t.names.lstrip("N")
    if dims.startswith("E") or dims == "VE":
        return t.size("E")
    return math.prod(t.size(c) for c in dims[:-1]) or 1


def random_weights(fn: Function, seed: int = 0) -> dict[str, np.ndarray]:
    """One float32 array per ``weight`` param of ``fn``, deterministic in ``seed`` and name."""
    out: dict[str, np.ndarray] = {}
    for p in fn.params_with_role("weight"):
        rng = np.random.default_rng([seed, *map(ord, p.name)])
        shape = p.type.shape
        core = p.type.names.lstrip("N")
        if p.name == "embed":
            w = rng.normal(0.0, 1.0, shape)
        elif p.kind == "norm":
            w = 1.0 + 0.1 * rng.normal(size=shape)
        elif p.kind == "bias" or len(core) == 1:
            w = 0.1 * rng.normal(size=shape)
        else:
            w = rng.normal(0.0, 1.0 / math.sqrt(fan_in(p.name, p.type)), shape)
        out[p.name] = w.astype(np.float32)
    return out


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, 7]).integers(0, vocab, (batch, length)).astype(np.int32)


def round_to(weights: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Rounds float32 weights to ``dtype`` and back, so the reference sees what the device holds."""
    if dtype in ("f32", "f64"):
        return dict(weights)
    np_t = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}[dtype]
    return {k: np.asarray(v).astype(np_t).astype(np.float32) for k, v in weights.items()}


#: Dims pad-heads and pad-dims may grow with zeros (heads, grouped-query K and G, the vocabulary,
#: d_ff, d_model).
PADDABLE_DIMS = frozenset("HKGVFE")
#: ... and the layer stack N: pipeline-stages pads it with identity layers (all-zero weights of a
#: residual layer add nothing; passes/pipeline_stages.py).
PADDABLE_DIMS = PADDABLE_DIMS | {"N"}


def fit_to_params(weights: Mapping[str, np.ndarray], params) -> dict[str, np.ndarray]:
    """Zero-pads host weights whose heads (H, or grouped K and G), vocabulary V, d_ff F or d_model E
    are smaller than the module declares (pad-heads, pad-dims): zero rows are exact there
    (passes/pad_heads.py and passes/pad_dims.py say why).

    Only those dims may differ, and only upward: any other mismatch is left for the executor's
    shape check to report."""
    out = dict(weights)
    for p in params:
        if p.name not in out:
            continue
        want = p.type.shape
        if getattr(out[p.name], "shape", None) == want:  # nothing to pad (and a lazy weight stays unread)
            continue
        a = np.asarray(out[p.name])
        if a.shape == want or a.ndim != len(want):
            continue
        grow = [(0, w - s) if d.name in PADDABLE_DIMS and s < w else (0, 0)
                for d, s, w in zip(p.type.dims, a.shape, want)]
        if all(s + g[1] == w for s, g, w in zip(a.shape, grow, want)):
            out[p.name] = np.pad(a, grow)
    return out


def fit_inputs(args: Mapping[str, np.ndarray], params) -> dict[str, np.ndarray]:
    """Zero-pads ``input`` args (tokens, positions) whose batch B is smaller than the module
    declares (pad-dims padded the batch): the padded rows are computed and dropped, so any
    in-range token and position does; 0 is both."""
    out = dict(args)
    for p in params:
        if p.role != "input" or p.name not in out or not p.type.has("B"):
            continue
        a = np.asarray(out[p.name])
        b, want = p.type.index("B"), p.type.size("B")
        if a.ndim == len(p.type.dims) and a.shape[b] < want:
            grow = [(0, want - a.shape[b]) if i == b else (0, 0) for i in range(a.ndim)]
            out[p.name] = np.pad(a, grow)
    return out
