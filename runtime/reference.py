"""The numpy reference: unsharded semantics in float64 — the oracle every rewrite is checked against."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ir.errors import LoweringError
from ir.module import Function, Module
from ir.types import TensorType
from runtime.kernels import Interpreter

_erf = np.frompyfunc(math.erf, 1, 1)

NP_DTYPES = {"f64": np.float64, "f32": np.float32, "f16": np.float16, "i32": np.int32, "i8": np.int8,
             "bool": np.bool_}


class NumpyBackend:
    """numpy semantics; floats are computed in ``float_type`` (float64 for the oracle)."""

    xp = np

    def __init__(self, float_type: type = np.float64):
        self.float_type = float_type

    def erf(self, x):
        return _erf(x).astype(x.dtype)

    def set_rows(self, cache, new, pos):
        out = cache.copy()
        for b in range(out.shape[0]):
            out[b, pos[b]] = new[b]
        return out

    def einsum(self, spec, *xs):
        return np.einsum(spec, *xs, optimize=True)

    def top_k(self, x, k):
        """The k largest along the last axis, descending, ties to the lower index (as torch.topk)."""
        idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, idx, axis=-1), idx

    def count_dropped(self, n):
        from runtime.kernels_moe import DROPPED

        DROPPED.add(n)

    def scatter_rows(self, buf, i, j, rows):
        """buf[i[n], j[n]] = rows[n]; pairs with j beyond buf's second dim are dropped."""
        out = buf.copy()
        keep = j < buf.shape[1]
        out[i[keep], j[keep]] = rows[keep]
        return out

    def scan(self, body, carry, consts, xs):
        n = xs[0].shape[0] if xs else 1
        ys_all: list[tuple] = []
        for i in range(n):
            carry, ys = body(carry, consts, tuple(x[i] for x in xs))
            ys_all.append(ys)
        stacked = tuple(np.stack([ys[j] for ys in ys_all]) for j in range(len(ys_all[0]))) if ys_all else ()
        return carry, stacked

    def float_dtype(self, dtype):
        return self.float_type

    def cast(self, x, dtype):
        if dtype in ("f64", "f32", "bf16", "f16"):
            return x.astype(self.float_type)
        return x.astype(NP_DTYPES[dtype])

    def axis_offset(self, t: TensorType, dim: str):
        return 0

    # The unsharded reference has no mesh: the rules only ask for groups of no axes.
    mesh: dict[str, int] = {}

    def group_size(self, axes):
        if axes:
            raise ValueError(f"the reference has no mesh axes {axes}")
        return 1

    def dynamic_slice(self, x, axis, start, size):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + size)
        return x[tuple(idx)]

    def dynamic_update_slice(self, x, y, axis, start):
        out = x.copy()
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + y.shape[axis])
        out[tuple(idx)] = y
        return out

    def fori_loop(self, lo, hi, body, init):
        state = init
        for i in range(lo, hi):
            state = body(i, state)
        return state

    # No mesh, so no collectives: a partitioned module belongs to runtime/spmd.py or JAX.
    def _no_mesh(self, *args: object) -> np.ndarray:
        raise LoweringError("the reference runs unpartitioned modules only; this one has collectives",
                            hint="run it with the SPMD simulator (runtime/spmd.py) or JAX")

    psum = psum_scatter = all_gather = all_to_all = axis_index = _no_mesh


def to_backend_array(x: np.ndarray, t: TensorType, float_type: type = np.float64) -> np.ndarray:
    """Converts a host array to what the reference computes with (floats widened)."""
    if t.dtype in ("f64", "f32", "bf16", "f16"):
        return np.asarray(x, dtype=float_type)
    return np.asarray(x, dtype=NP_DTYPES[t.dtype])


def run_reference(module: Module, entry: str, args: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                  float_type: type = np.float64) -> tuple[np.ndarray, ...]:
    """Runs one entry function on host arrays (by param name or in order) in ``float_type``."""
    fn: Function = module.function(entry)
    if isinstance(args, Mapping):
        missing = [p.name for p in fn.params if p.name not in args]
        if missing:
            raise KeyError(f"missing arguments for @{entry}: {', '.join(missing)}")
        seq = [args[p.name] for p in fn.params]
    else:
        seq = list(args)
    arrays = [to_backend_array(a, p.type, float_type) for a, p in zip(seq, fn.params)]
    return Interpreter(module, NumpyBackend(float_type)).call(fn, arrays)
