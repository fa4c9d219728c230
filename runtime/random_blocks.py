"""Random weights any block of which can be made alone: ``run``'s weights across processes.

``runtime.weights.random_weights`` draws each array in one sequence, so a block of it cannot be
made without the rest. Here every element is a function of (seed, weight name, its flat index):
two SplitMix64 hashes of the index give two uniforms and Box-Muller a standard normal, scaled
as ``random_weights`` scales it (same roles, same distributions, other values). A weight is a
``runtime.sliced_weights.LazyWeight``, so ``jax.make_array_from_callback`` asks each process
for its devices' blocks only (runtime/distributed.py) and no process makes a whole array unless
it needs one (process 0's ``--check`` reference). :data:`BUILT` counts the elements made.
"""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np

from ir.module import Function
from runtime.sliced_weights import LazyWeight, ReadStats
from runtime.weights import fan_in

#: Bytes of float32 weight values made here (this process's share, for the measured figures).
BUILT = ReadStats()
_ROUND = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def normal_at(key: int, flat: np.ndarray) -> np.ndarray:
    """Standard normal float64 values, one per flat index, a function of ``key`` and the index only."""
    i = flat.astype(np.uint64) * np.uint64(2) ^ np.uint64(key)
    scale = 1.0 / float(1 << 53)
    u1 = ((_splitmix64(i) >> np.uint64(11)).astype(np.float64) + 1.0) * scale  # (0, 1]
    u2 = (_splitmix64(i + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * scale
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _flat_indices(shape: tuple[int, ...], idx: tuple[slice, ...], offset: int) -> np.ndarray:
    ranges = [np.arange(*s.indices(n), dtype=np.int64) for s, n in zip(idx, shape)]
    if not ranges:
        return np.full((), offset, np.int64)
    return np.ravel_multi_index(np.ix_(*ranges), shape).astype(np.int64) + offset


def lazy_random_weights(fn: Function, seed: int = 0, dtype: str = "f32") -> dict[str, LazyWeight]:
    """One lazy float32 weight per ``weight`` param of ``fn`` (``random_weights``' roles and
    scales), rounded through ``dtype`` (bf16, f16) as ``runtime.weights.round_to`` would."""
    out: dict[str, LazyWeight] = {}
    for p in fn.params_with_role("weight"):
        shape, core = p.type.shape, p.type.names.lstrip("N")
        layered = p.type.names.startswith("N") and len(shape) > len(core)
        per = shape[1:] if layered else shape
        if p.name == "embed":
            mean, std = 0.0, 1.0
        elif p.kind == "norm":
            mean, std = 1.0, 0.1
        elif p.kind == "bias" or len(core) == 1:
            mean, std = 0.0, 0.1
        else:
            mean, std = 0.0, 1.0 / math.sqrt(fan_in(p.name, p.type))
        key = zlib.crc32(f"{seed}:{p.name}".encode()) * 0x100000001 & 0xFFFFFFFFFFFFFFFF

        def read(layer: int | None, idx: tuple[slice, ...], per: tuple[int, ...] = per, key: int = key,
                 mean: float = mean, std: float = std) -> np.ndarray:
            offset = (layer or 0) * math.prod(per)
            w = (mean + std * normal_at(key, _flat_indices(per, idx, offset))).astype(np.float32)
            BUILT.add(w.nbytes)
            return w if dtype not in _ROUND else w.astype(_ROUND[dtype]).astype(np.float32)

        out[p.name] = LazyWeight(p.name, shape, np.dtype(np.float32), read, layered)
    return out
