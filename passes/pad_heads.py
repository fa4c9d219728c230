"""``pad-heads``: zero-pads query heads so that they divide over the devices that shard them.

PaLM 540B has 48 heads and is served on 64 chips; the paper pads to 64 (§4). Padded query
heads have zero W_q rows and zero W_o rows, so their attention output is multiplied by zero:
the logits are unchanged. With multihead attention the K/V heads share the letter H and are
padded too (zero keys and values, and the KV cache grows by the padding). The pass changes the
params' H size; the runtime zero-pads host weights whose H is smaller than declared
(runtime/weights.py ``fit_to_params``), so checkpoints keep their shape and each device
holds only its share of the padded weights.
Grouped-query heads (K x G) are not padded: use attn=batch or a mesh that divides them.

Padding costs weight memory and bandwidth, so the default pipeline pads only as far as the
layout shards the heads (compiler/driver.py ``head_multiple``): to all devices under
attn=heads (Q's partial sums are reduce-scattered onto the heads over every axis) or 1D-WS,
else to the wide weight axes (all but the first), all that attn=batch needs.
PaLM 540B on 4x4x4 is padded 48 -> 64 under attn=heads and 1D-WS, not under 2D-WS with
attn=batch (48 heads over 16 devices).
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.errors import PassError
from ir.module import Module, ModuleContext, Param
from ir.ops import Scan
from ir.retype import reinfer
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.registry import register


def _padded(t: TensorType, size: int) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, size, d.axes) if d.name == "H" else d for d in t.dims), t.partial)


@register
@dataclass(frozen=True)
class PadHeads(Pass):
    """Pads the query-head dim H with zero weights up to a multiple of ``multiple``."""

    name = "pad-heads"
    summary = "zero-pad query heads to a multiple of the sharding (identical outputs)"

    #: Heads are padded to a multiple of this; 0 means the number of devices of the mesh.
    multiple: int = 0

    def __post_init__(self) -> None:
        if self.multiple < 0:
            raise PassError(f"pad-heads: multiple must be >= 0, got {self.multiple}")

    def run(self, module: Module) -> PassResult:
        mult = self.multiple or module.n_devices
        heads = {t.size("H") for f in module.functions for t in f.value_types.values() if t.has("H")}
        if not heads:
            return PassResult(module, {"no H dim (grouped-query or none)": 1})
        h = heads.pop()
        target = -(-h // mult) * mult
        if target == h:
            return PassResult(module, {"heads already divide": h})
        fns = {f.name: f for f in module.functions}
        for entry in module.entries:
            params = tuple(Param(p.name, _padded(p.type, target), p.role) if p.type.has("H") else p
                           for p in entry.params)
            for sc in [op for op in entry.ops if isinstance(op, Scan)]:
                body = fns[sc.body.name]
                b_params = tuple(Param(q.name, _padded(q.type, target), q.role) if q.type.has("H") else q
                                 for q in body.params)
                fns[body.name] = reinfer(body, b_params, ModuleContext(module.with_functions(list(fns.values()))))
            ctx = ModuleContext(module.with_functions(list(fns.values())))
            fns[entry.name] = reinfer(entry, params, ctx)
        padded = sum(p.type.has("H") for f in module.entries for p in f.params)
        out = module.with_functions([fns[f.name] for f in module.functions])
        return PassResult(out, {f"heads padded {h} -> {target}": 1, "padded params": padded})
