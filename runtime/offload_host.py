"""``--offload host``: per-layer weights in pinned host memory, moved to the device layer by layer
inside the compiled program (the pattern of JAX's host-offloading guide).

The runner keeps each layer's weights as its own array (split_layers), placed with memory kind
``pinned_host``; the layer loop of the lowered program (JaxBackend.scan over per-layer lists)
``device_put``s layer i's weights to device memory just before layer i, so XLA schedules the
host-to-device copies inside the step and can overlap the copy of layer i+1 with the compute of
layer i. Global weights (embedding, head) and the KV caches stay in device memory. On an
accelerator this frees device memory for batch; on this CPU every memory kind is the same RAM,
so the path is tested for equality here and measured where a GPU is lent.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ir.errors import SpecError
from ir.module import Function, Module
from runtime.lower_jax import JaxBackend, layer_split
from runtime import xla_options
from runtime.xla_options import function_int8


def host_sharding() -> Any:
    """Pinned host memory of the first device (SpecError when the platform has none)."""
    dev = jax.devices()[0]
    kinds = {m.kind for m in dev.addressable_memories()}
    if "pinned_host" not in kinds:
        raise SpecError(f"{dev.platform} devices have no pinned_host memory (they have {sorted(kinds)}); "
                        "--offload host cannot run here", hint="use --offload disk")
    return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")


class HostOffloadBackend(JaxBackend):
    """JaxBackend whose layer loop moves each layer's per-layer operands to device memory
    first (a no-op for operands already there, such as the KV caches)."""

    def scan(self, body, carry, consts, xs):
        if any(isinstance(x, list) for x in xs):
            dev = jax.memory.Space.Device
            xs = tuple([jax.device_put(a, dev) for a in x] if isinstance(x, list) else x for x in xs)
        return super().scan(body, carry, consts, xs)


def place_on_host(params: dict, fn: Function) -> dict:
    """The per-layer weights moved to pinned host memory; the rest left on the device."""
    if len(jax.devices()) and fn.params and any(p.type.dims and any(d.axes for d in p.type.dims)
                                                 for p in fn.params_with_role("weight")):
        raise SpecError("--offload host runs on one device; drop --mesh")
    host = host_sharding()
    types = {p.name: p.type for p in fn.params_with_role("weight")}
    return {k: ([jax.device_put(a, host) for a in v] if layer_split(types[k]) and isinstance(v, list) else v)
            for k, v in params.items()}


def host_bytes(params: dict) -> int:
    """Bytes of the weights held in host memory."""
    return sum(int(a.size) * a.dtype.itemsize for v in params.values() if isinstance(v, list) for a in v
               if a.sharding.memory_kind == "pinned_host")


def host_logits(build: Callable[[int], Module], weights: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """``logits_of`` for runtime.scoring.score_with with per-layer weights in pinned host memory
    (moved to the device layer by layer inside each program): ``build(L)`` gives the prefill
    module of length L with ``logits = all``; weights are prepared once, for the first one."""
    from runtime.generate import prepared_weights
    from runtime.lower_jax import JNP_DTYPES, JaxExecutor, entry_program

    progs: dict[int, tuple[Function, Any, dict]] = {}
    params: dict[str, Any] = {}

    def split(x: Any, t: Any) -> Any:
        a = np.asarray(x)
        dt = JNP_DTYPES[t.dtype]
        return [jnp.asarray(a[i], dt) for i in range(a.shape[0])] if layer_split(t) else jnp.asarray(a, dt)

    def logits_of(tokens: np.ndarray) -> np.ndarray:
        L = int(tokens.shape[1])
        if L not in progs:
            module = build(L)
            fn = module.function("prefill")
            if not params:
                host = prepared_weights(JaxExecutor(module), weights)
                params.update(place_on_host({p.name: split(host[p.name], p.type)
                                             for p in fn.params_with_role("weight")}, fn))
            program, _ = entry_program(module, "prefill", HostOffloadBackend(), split_layers=True)
            caches = {p.name: split(np.zeros(p.type.shape, JNP_DTYPES[p.type.dtype]), p.type)
                      for p in fn.params_with_role("cache")}
            progs[L] = (fn, xla_options.jit(program, function_int8(fn)), caches)
        fn, prog, caches = progs[L]
        env = {**params, **caches, "tokens": jnp.asarray(tokens, jnp.int32),
               "pos": jnp.arange(L, dtype=jnp.int32)[None, :]}
        return np.asarray(prog(*[env[p.name] for p in fn.params])[0])[0]

    return logits_of
