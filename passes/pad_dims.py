"""``pad-dims``: zero-pads d_ff (F), d_model (E) and the batch (B) so that they divide the devices
that shard them, instead of refusing the layout.

* **F** (d_ff): zero columns of the FFN input weights (and biases) and zero rows of the output
  weight. Every activation of 0 is 0 (gelu, silu; swiglu multiplies two zeros), so the padded
  hidden units contribute nothing: exact.
* **E** (d_model): zero columns of every weight that reads or writes the residual stream
  (embedding, projections, norm scales and biases), so the residual stream's padding starts at
  zero and stays zero (each residual add adds a zero column). Norms get ``size`` = the true E:
  their mean and variance count only the real entries (ir/ops.py ``Norm``); their zero scale
  and bias keep the padding zero after them. Logits contract E against zero columns: unchanged.
* **B** (batch): the inputs and the KV caches grow by whole rows. The padded rows are computed
  and dropped: results that are not state (logits) are split back to the true batch before the
  entry returns; caches keep the padded batch (they come back as the next step's input). The
  runtime zero-pads the token and position inputs (runtime/generate.py ``fit_inputs``).

Checkpoints keep their shape: the runtime zero-pads host weights whose F or E is smaller than
declared (runtime/weights.py ``fit_to_params``). Like ``pad-heads`` the pass changes param
types, so each device holds only its share of the padded weights, and the cost model prices
the padded program as compiled. compiler/pipelines.py ``dim_pad_options`` says how far each
layout needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ir.errors import PassError
from ir.module import Function, Module, ModuleContext, Param
from ir.retype import reinfer, rewrite_entries, split_back
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.registry import register

#: Option name -> the dim letter it pads.
DIMS = {"d_ff": "F", "d_model": "E", "batch": "B"}


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def _sizes(module: Module, dim: str) -> set[int]:
    return {t.size(dim) for f in module.functions for t in f.value_types.values() if t.has(dim)}


def _padded(t: TensorType, sizes: dict[str, int]) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, sizes.get(d.name, d.size), d.axes) for d in t.dims), t.partial)


@register
@dataclass(frozen=True)
class PadDims(Pass):
    """Pads F, E and B up to multiples with zeros (identical outputs at the true sizes)."""

    name = "pad-dims"
    summary = "zero-pad d_ff, d_model and the batch to divide the sharding (identical outputs)"
    runs_after = ("pad-heads",)

    #: Pad d_ff (F) to a multiple of this (0: leave it).
    d_ff: int = 0
    #: Pad d_model (E) to a multiple of this (0: leave it).
    d_model: int = 0
    #: Pad the batch (B) to a multiple of this (0: leave it).
    batch: int = 0

    def __post_init__(self) -> None:
        for f in DIMS:
            if getattr(self, f) < 0:
                raise PassError(f"pad-dims: {f} must be >= 0, got {getattr(self, f)}")

    def _targets(self, module: Module) -> tuple[dict[str, int], dict[str, int]]:
        grown: dict[str, int] = {}
        stats: dict[str, int] = {}
        for opt, dim in DIMS.items():
            mult = getattr(self, opt)
            sizes = _sizes(module, dim)
            if not mult or not sizes:
                continue
            if len(sizes) > 1:
                raise PassError(f"pad-dims: dim {dim} has several sizes ({sorted(sizes)}); it pads one model's "
                                f"{opt} before fusion and int8 change the weights",
                                hint="run pad-dims first in the pipeline")
            (n,) = sizes
            if _up(n, mult) != n:
                grown[dim] = _up(n, mult)
                stats[f"{dim} padded {n} -> {grown[dim]}"] = 1
        return grown, stats

    def run(self, module: Module) -> PassResult:
        grown, stats = self._targets(module)
        if not grown:
            return PassResult(module, stats or {"nothing to pad": 1})
        true = {d: next(iter(_sizes(module, d))) for d in grown}

        def pad(ps: tuple[Param, ...]) -> tuple[Param, ...]:
            return tuple(replace(p, type=_padded(p.type, grown)) if any(p.type.has(d) for d in grown) else p
                         for p in ps)

        def retype(fn: Function, ctx: ModuleContext) -> Function:
            return reinfer(_true_norms(fn, true), pad(fn.params), ctx)

        fns = rewrite_entries(module, lambda body, _, ctx: retype(body, ctx),
                              lambda entry, ctx: split_back(retype(entry, ctx), entry, ctx))
        if module.prepare is not None:
            ctx = ModuleContext(module.with_functions(list(fns.values())))
            fns[module.prepare.name] = retype(module.prepare, ctx)
        stats["padded params"] = sum(any(p.type.has(d) for d in grown) for f in module.entries for p in f.params)
        stats["norms over a padded dim"] = sum(op.kind == "norm" and op.dim in grown
                                               for f in fns.values() for op in f.ops)
        return PassResult(module.with_functions([fns[f.name] for f in module.functions]), stats)


def _true_norms(fn: Function, true: dict[str, int]) -> Function:
    """Norms over a dim that grows count only its real entries (a size already set is kept)."""
    ops = tuple(op.with_(size=true[op.dim]) if op.kind == "norm" and op.dim in true and not op.size else op
                for op in fn.ops)
    return Function(fn.name, fn.params, ops, fn.returns, fn.result_types, fn.entry)
