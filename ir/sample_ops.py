"""``sample``: the next token of each row from its logits, inside a compiled program.

A generation schedule that keeps the pipeline full across tokens (``pipeline_generate``,
ir/pipeline_ops.py) must pick each micro-batch's next token where it re-enters stage 0, so
token selection is an op of the IR rather than a step of the host loop. Its semantics are
runtime/sampling.py's: greedy rows take the argmax; sampled rows draw with the key
``fold_in(PRNGKey(seed), position + offset)``, so a row's tokens depend on its seed and
positions only, and a pipelined run gives the tokens one device gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ir.ops import Op, fail, op_kind, require_not_partial
from ir.types import Dim, TensorType


@op_kind("sample")
@dataclass(frozen=True, kw_only=True)
class Sample(Op):
    """``sample(logits [B, L, V], pos [B, L], temperature [B], top_k [B], top_p [B], seed [B])``
    -> i32 [B, L]: the token after each position. ``offset``: the sampled token's position is
    ``pos + offset``. ``greedy``: every row is greedy, so the sampling branch (a sort over V) is
    left out of the program."""

    offset: int = 1
    greedy: bool = field(default=False, metadata={"omit_default": True})
    arity = (6, 6)

    def infer(self, ins, ctx):
        logits, pos, temp, top_k, top_p, seed = ins
        require_not_partial("sample", logits)
        if [d.name for d in logits.dims] != ["B", "L", "V"] or logits.dtype not in ("f32", "bf16", "f16", "f64"):
            raise fail(f"sample takes float logits [B, L, V], got {logits}")
        if logits.dim("V").axes:
            raise fail(f"sample needs the whole vocabulary on every device, got {logits}; all_gather V first")
        b = logits.dims[0]
        if pos != TensorType("i32", (b, logits.dims[1])):
            raise fail(f"sample: positions must be i32 [B, L] like the logits' rows, got {pos}")
        for t, dt in ((temp, "f32"), (top_k, "i32"), (top_p, "f32"), (seed, "i32")):
            if t != TensorType(dt, (Dim("B", b.size, b.axes),)):
                raise fail(f"sample: per-row parameters must be {dt} [B={b.size}], got {t}")
        return (TensorType("i32", (b, logits.dims[1])),)
