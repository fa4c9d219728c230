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

from typing import Any

import jax

from ir.errors import SpecError
from ir.module import Function
from runtime.lower_jax import JaxBackend, layer_split


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
