"""Weight-only int8: ``quantize`` (at weight-load time) and ``dequantize`` (before each matmul).

Scales are symmetric, per output channel: the absolute maximum over the dims a matmul contracts
(``reduce``), divided by 127. A scale therefore has the weight's output dims, sharded as the
weight is, so dequantization is local on every device. A fused weight whose contracted dim packs
several segments (attention output + FFN output) gets one scale per segment and output channel:
dim ``S`` replaces the packed dim in the scale, and the packing's interleave ``groups`` tell a
device which of its rows belong to which segment. Matmuls run in floating point after
dequantization; there is never an int8-output matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.fusion_ops import local_groups
from ir.ops import Op, fail, make_type, op_kind, require_not_partial
from ir.types import FLOAT_DTYPES, Dim, TensorType

#: Dtype of the scales: f32 whatever the weights, so a scale never adds rounding of its own.
SCALE_DTYPE = "f32"


@dataclass(frozen=True, kw_only=True)
class _QuantAttrs(Op):
    #: Dims the absmax runs over (the dims the consuming matmul contracts).
    reduce: str
    #: Sizes of the packed segments along ``reduce`` (one reduced dim), or () for none.
    segments: tuple[int, ...] = ()
    #: Interleave groups of the packing (see ir/fusion_ops.py).
    groups: int = 1

    def scale_type(self, w: TensorType, ctx) -> TensorType:
        if not self.reduce or any(not w.has(c) for c in self.reduce):
            raise fail(f"{self.kind}: reduce dims {self.reduce!r} must be dims of the weight {w.names}")
        dims = []
        if self.segments:
            if len(self.reduce) != 1:
                raise fail(f"{self.kind}: segmented scales reduce exactly one (packed) dim, got {self.reduce!r}")
            c = self.reduce
            if sum(self.segments) != w.size(c) or any(s % self.groups for s in self.segments):
                raise fail(f"{self.kind}: segments {list(self.segments)} do not pack {c}={w.size(c)} "
                           f"in {self.groups} groups")
            local_groups(self.groups, w.dim(c).axes, ctx.mesh)
            if w.has("S"):
                raise fail(f"{self.kind}: the weight already has a dim S for the segment scales")
        for d in w.dims:
            if d.name in self.reduce:
                if self.segments:
                    dims.append(Dim("S", len(self.segments)))
            else:
                dims.append(d)
        return make_type(self.kind, SCALE_DTYPE, dims)


@op_kind("quantize")
@dataclass(frozen=True, kw_only=True)
class Quantize(_QuantAttrs):
    """float weight -> (int8 weight, f32 scales); the absmax over a sharded reduce dim is a max
    across its devices (a tiny collective, once, at load time)."""

    arity = (1, 1)

    def infer(self, ins, ctx):
        (w,) = ins
        if w.dtype not in FLOAT_DTYPES:
            raise fail(f"quantize needs a floating-point weight, got {w.dtype}")
        require_not_partial("quantize", w)
        return (w.with_dtype("i8"), self.scale_type(w, ctx))


@op_kind("dequantize")
@dataclass(frozen=True, kw_only=True)
class Dequantize(_QuantAttrs):
    """(int8 weight, scales) -> weight in ``dtype``: q * scale, broadcast by dim name."""

    dtype: str = "f32"
    arity = (2, 2)

    def infer(self, ins, ctx):
        q, s = ins
        if q.dtype != "i8":
            raise fail(f"dequantize needs an i8 weight, got {q.dtype}")
        if self.dtype not in FLOAT_DTYPES:
            raise fail(f"dequantize to {self.dtype!r}: not a floating-point dtype")
        require_not_partial("dequantize", q)
        want = self.scale_type(q, ctx)
        if s.dtype != SCALE_DTYPE or s.names != want.names or s.shape != want.shape or s.partial:
            raise fail(f"dequantize: scales must be {want} for weight {q}, got {s}")
        for d in s.dims:
            if d.name != "S" and d.axes != q.dim(d.name).axes:
                raise fail(f"dequantize: scale dim {d.name} is sharded {{{','.join(d.axes)}}} but the weight's "
                           f"is {{{','.join(q.dim(d.name).axes)}}}")
            if d.name == "S" and d.axes:
                raise fail("dequantize: the segment dim S of the scales cannot be sharded")
        return (q.with_dtype(self.dtype),)
