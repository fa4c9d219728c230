"""Hand-written CPU kernels, called from XLA programs through the FFI.

One kernel so far, ``int_rows_dot`` (int_rows_dot.cc): a few int8 activation rows times an int8
weight stored ``[out, in]``, summed exactly in int32 — the product of
:func:`runtime.lower_jax.int8_dot`, which an int8 decode step spends most of its time on. XLA's
own int8 dot runs it at a third of the memory's read rate on a CPU without AVX-VNNI; the kernel
streams the weight near that rate, and its exact integer sums equal XLA's bit for bit. The C++
source is compiled at first use (:mod:`runtime.cpu_kernels.build`) and registered as an XLA FFI
target; where that cannot happen (no C++ compiler, a CPU without AVX2, a backend other than
the CPU) :func:`available` is False with the reason in :func:`status`, and the caller keeps
XLA's dot. ``EINSHARD_CPU_KERNELS=0`` turns the kernels off (A/B measurements).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp

from runtime.cpu_kernels.build import BuildError, build

#: most activation rows the kernel takes (a decode step's batch); more rows are a prefill,
#: compute-bound, where XLA's blocked matrix-matrix kernels win
MAX_ROWS = 16

TARGET = "einshard_int_rows_dot"

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _load() -> str | None:
    """Builds, loads and registers the kernel once per process; None when it is usable, else
    why not."""
    with _lock:
        if "why" in _state:
            return _state["why"]
        why: str | None = None
        if os.environ.get("EINSHARD_CPU_KERNELS", "1") == "0":
            why = "turned off by EINSHARD_CPU_KERNELS=0"
        elif jax.default_backend() != "cpu":
            why = f"the default backend is {jax.default_backend()}, not cpu"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build()))
                if not lib.einshard_cpu_supported():
                    why = "this CPU lacks AVX2"
                else:
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EinshardIntRowsDot),
                                                platform="cpu")
                    _state["lib"] = lib
            except (BuildError, OSError) as e:
                why = f"could not build the kernels: {e}"
        _state["why"] = why
        return why


def available() -> bool:
    """Whether :func:`int_rows_dot` runs the hand-written kernel in this process."""
    return _load() is None


def status() -> str:
    """``"on"``, or why the kernels are off (for reports and benchmarks)."""
    return _load() or "on"


def int_accepts(xq: Any, w: Any) -> bool:
    """Whether ``int_rows_dot(xq, w)`` takes this pair: int8 rows ``xq[P, C]`` (P <= MAX_ROWS)
    and an int8 weight ``w[Q, C]``, the kernel available."""
    return (xq.ndim == 2 and w.ndim == 2 and xq.shape[1] == w.shape[1] and 1 <= xq.shape[0] <= MAX_ROWS
            and xq.dtype == jnp.int8 and w.dtype == jnp.int8 and available())


def int_rows_dot(xq: jax.Array, w: jax.Array) -> jax.Array:
    """``xq[P, C] @ w[Q, C].T`` for int8 operands, summed exactly in int32 (equal, bit for bit,
    to XLA's int8 dot with ``preferred_element_type=int32``). Only where :func:`int_accepts`."""
    why = _load()
    if why is not None:
        raise RuntimeError(f"the CPU kernels are off: {why}")
    out = jax.ShapeDtypeStruct((xq.shape[0], w.shape[0]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(xq, w)
