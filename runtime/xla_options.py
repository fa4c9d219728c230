"""XLA compiler options of the runtime's jitted programs (one place, so every jit site agrees).

XLA CPU (jax 0.10) hands whole fused subgraphs to the YNNPACK library: dots with their
neighbours (``DOT``), elementwise chains (``ELTWISE``) and reductions (``REDUCE``), besides single
dots (``INDIVIDUAL_DOT``). On resident int8 SmolLM2 the prefill at batch 64 (512 rows) gives
logits 23 away from batch 1's (argmax changed) with the default fusion types, and with
``ELTWISE`` or ``REDUCE`` alone as well; with ``INDIVIDUAL_DOT`` alone it equals batch 1
exactly (docs/design-notes.md, "int8 at batch >= 64"). Single dots stay in the library, so
the int8 x int8 dot (runtime/lower_jax.py int8_dot) keeps its speed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from ir.module import Function

#: the YNNPACK fusion types an int8 program on the CPU keeps (single dots only)
INT8_CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def function_int8(fn: Function) -> bool:
    """Whether an IR entry takes int8 weights (``--weights int8``)."""
    return any(p.type.dtype == "i8" for p in fn.params_with_role("weight"))


def tree_int8(*trees: Any) -> bool:
    """Whether any array leaf of ``trees`` (prepared params, resident globals) is int8."""
    return any(getattr(x, "dtype", None) == np.int8 for t in trees for x in jax.tree_util.tree_leaves(t))


def program_options(int8: bool) -> dict[str, str]:
    """compiler_options for a program: the int8 ones on the CPU backend only (other backends
    have no YNNPACK and reject the option), none otherwise."""
    return dict(INT8_CPU_OPTIONS) if int8 and jax.default_backend() == "cpu" else {}


def jit(fun: Callable, int8: bool, **kw: Any) -> Any:
    """``jax.jit(fun, **kw)`` with :func:`program_options` merged into any compiler_options."""
    opts = {**program_options(int8), **(kw.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=opts or None, **kw)
