"""``pad-heads``: zero-pads heads (and the vocabulary) so that they divide over the devices that shard them.

PaLM 540B has 48 heads and is served on 64 chips; the paper pads to 64 (§4). Padded query
heads have zero W_q rows and zero W_o rows, so their attention output is multiplied by zero:
the logits are unchanged. With multihead attention the K/V heads share the letter H and are
padded too (zero keys and values, and the KV cache grows by the padding).

Grouped-query heads (K x G) are padded per letter: ``kv_heads`` adds zero K/V heads, each with
its G zero query heads (zero keys and values give a uniform softmax over zero values: a zero
output, times zero W_o rows); ``groups`` adds zero query heads inside every group (their
attention output is real but meets zero W_o rows). Either way the logits are unchanged.
passes/layouts.py ``padded_heads`` chooses the targets for a layout (compiler/driver.py asks it
for ``kv = pad``); a bare ``multiple`` pads G until K x G divides it.

``vocab`` pads V with zero embedding rows (no token looks them up) and zero output-head rows;
the padded logits are split off before the entry returns, so results keep the true V.

The pass changes the params' sizes; the runtime zero-pads host weights whose H, K, G or V is
smaller than declared (runtime/weights.py ``fit_to_params``), so checkpoints keep their shape
and each device holds only its share of the padded weights.

Padding costs weight memory and bandwidth, so the default pipeline pads only as far as the
layout shards the heads (compiler/driver.py ``head_multiple``): the wide weight axes (all
devices in 1D-WS, Y·Z in 2D-WS and the weight-gathered layouts). PaLM 540B on 4x4x4 is
padded 48 -> 64 under 1D-WS, not under 2D-WS (48 heads over 16 devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ir.errors import PassError
from ir.module import Function, Module, ModuleContext, Param
from ir.retype import reinfer, rewrite_entries, split_back
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.registry import register


def _padded(t: TensorType, sizes: dict[str, int]) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, sizes.get(d.name, d.size), d.axes) for d in t.dims), t.partial)


def _sizes(module: Module, dim: str) -> set[int]:
    return {t.size(dim) for f in module.functions for t in f.value_types.values() if t.has(dim)}


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


@register
@dataclass(frozen=True)
class PadHeads(Pass):
    """Pads H (or grouped-query K and G) and optionally V with zero weights (identical outputs)."""

    name = "pad-heads"
    summary = "zero-pad heads (H, or grouped K x G) and the vocabulary to divide the sharding (identical outputs)"

    #: Heads (H, or K x G by padding G) are padded to a multiple of this; 0: the mesh's devices.
    multiple: int = 0
    #: Grouped-query: pad the K/V heads to this many (0: leave K, or pad by ``multiple``).
    kv_heads: int = 0
    #: Grouped-query: pad the query heads per group to this many (0: leave G, or pad by ``multiple``).
    groups: int = 0
    #: Pad the vocabulary to a multiple of this (0: leave it).
    vocab: int = 0

    def __post_init__(self) -> None:
        for f in ("multiple", "kv_heads", "groups", "vocab"):
            if getattr(self, f) < 0:
                raise PassError(f"pad-heads: {f} must be >= 0, got {getattr(self, f)}")

    def _targets(self, module: Module) -> tuple[dict[str, int], dict[str, int]]:
        """The padded size of each dim that grows, and the statistics that say so."""
        mult = self.multiple or module.n_devices
        new: dict[str, int] = {}
        stats: dict[str, int] = {}
        hs, ks, gs = _sizes(module, "H"), _sizes(module, "K"), _sizes(module, "G")
        if hs:
            h = hs.pop()
            new["H"] = _up(h, mult)
            if new["H"] == h:
                stats["heads already divide"] = h
        elif ks and gs:
            k, g = ks.pop(), gs.pop()
            if self.kv_heads or self.groups:
                k2, g2 = max(k, self.kv_heads), max(g, self.groups)
            else:  # G alone, until K x G divides ``multiple``
                k2, g2 = k, _up(g, mult // math.gcd(k, mult))
            new.update(K=k2, G=g2)
            if (k2, g2) == (k, g):
                stats["heads already divide"] = k * g
            elif k2 != k:
                stats[f"kv heads padded {k} -> {k2}"] = 1
            if g2 != g and (k2, g2) != (k, g):
                stats[f"query heads per group padded {g} -> {g2}"] = 1
        else:
            stats["no head dims"] = 1
        if self.vocab:
            for v in _sizes(module, "V"):
                if _up(v, self.vocab) != v:
                    new["V"] = _up(v, self.vocab)
                    stats[f"vocab padded {v} -> {new['V']}"] = 1
        grown = {d: s for d, s in new.items() if s not in _sizes(module, d)}
        if "H" in grown:
            stats[f"heads padded {h} -> {grown['H']}"] = 1
        return grown, stats

    def run(self, module: Module) -> PassResult:
        grown, stats = self._targets(module)
        if not grown:
            return PassResult(module, stats)

        def pad(ps: tuple[Param, ...]) -> tuple[Param, ...]:
            return tuple(replace(p, type=_padded(p.type, grown)) if any(p.type.has(d) for d in grown) else p
                         for p in ps)

        fns = rewrite_entries(module, lambda body, _, ctx: reinfer(body, pad(body.params), ctx),
                              lambda entry, ctx: split_back(reinfer(entry, pad(entry.params), ctx), entry, ctx, dims=("V",)))
        if module.prepare is not None:
            prep = module.prepare
            ctx = ModuleContext(module.with_functions(list(fns.values())))
            fns[prep.name] = reinfer(prep, pad(prep.params), ctx)
        stats["padded params"] = sum(any(p.type.has(d) for d in grown) for f in module.entries for p in f.params)
        return PassResult(module.with_functions([fns[f.name] for f in module.functions]), stats)
