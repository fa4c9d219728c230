"""JAX lowering: each op through the shared rule table onto jax.numpy / jax.lax, jitted.

Lowering is interpretation under tracing: the Interpreter walks the function with jnp arrays
inside ``jax.jit``, so every op becomes XLA through its rule in ``runtime/kernels.py``. Layer
bodies run in ``lax.scan`` over the stacked weights and the KV cache arguments are donated so
decode updates them in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ir.module import Function, Module
from ir.types import TensorType
from runtime.kernels import Interpreter

JNP_DTYPES = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16,
              "i32": jnp.int32, "i8": jnp.int8, "bool": jnp.bool_}


class JaxBackend:
    xp = jnp

    def __init__(self, precision: Any = lax.Precision.HIGHEST):
        self.precision = precision

    def erf(self, x):
        return jax.scipy.special.erf(x)

    def set_rows(self, cache, new, pos):
        b = jnp.arange(cache.shape[0])[:, None]
        return cache.at[b, pos].set(new)

    def einsum(self, spec, *xs):
        return jnp.einsum(spec, *xs, precision=self.precision)

    def scan(self, body, carry, consts, xs):
        def step(c, x):
            return body(c, consts, x)

        return lax.scan(step, carry, xs)

    def float_dtype(self, dtype):
        return JNP_DTYPES[dtype]

    def cast(self, x, dtype):
        return x.astype(JNP_DTYPES[dtype])

    def axis_offset(self, t: TensorType, dim: str):
        return 0


@dataclass
class JaxEntry:
    """A jitted entry function with its parameter order and donated cache arguments."""

    fn: Function
    jitted: Any

    def __call__(self, args: Mapping[str, Any]) -> tuple:
        missing = [p.name for p in self.fn.params if p.name not in args]
        if missing:
            raise KeyError(f"missing arguments for @{self.fn.name}: {', '.join(missing)}")
        return self.jitted(*[args[p.name] for p in self.fn.params])

    def lower(self, args: Mapping[str, Any]):
        return self.jitted.lower(*[args[p.name] for p in self.fn.params])


def lower_entry(module: Module, entry: str, backend: JaxBackend | None = None) -> JaxEntry:
    """Jits one entry function of ``module``; cache params are donated."""
    fn = module.function(entry)
    interp = Interpreter(module, backend or JaxBackend())

    def program(*args):
        return interp.call(fn, args)

    donate = tuple(i for i, p in enumerate(fn.params) if p.role == "cache")
    return JaxEntry(fn, jax.jit(program, donate_argnums=donate))


def to_device(x: np.ndarray, t: TensorType) -> jax.Array:
    return jnp.asarray(x, dtype=JNP_DTYPES[t.dtype])


class JaxExecutor:
    """Runs entries of a module with JAX, converting host arrays to the declared dtypes."""

    name = "jax"

    def __init__(self, module: Module):
        self.module = module
        self.entries = {f.name: lower_entry(module, f.name) for f in module.entries}

    def prepare(self, entry: str, args: Mapping[str, Any]) -> dict[str, Any]:
        fn = self.module.function(entry)
        return {p.name: args[p.name] if isinstance(args[p.name], jax.Array) else to_device(args[p.name], p.type)
                for p in fn.params}

    def call(self, entry: str, args: Mapping[str, Any]) -> tuple:
        return self.entries[entry](self.prepare(entry, args))

    @staticmethod
    def to_host(x: Any) -> np.ndarray:
        return np.asarray(jnp.asarray(x, dtype=jnp.float32) if x.dtype == jnp.bfloat16 else x)
