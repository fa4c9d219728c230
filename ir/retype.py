"""Re-infers a function's types after its param types change (e.g. a padded dim)."""

from __future__ import annotations

from ir.errors import VerifyError
from ir.module import Function, ModuleContext, Param


def reinfer(fn: Function, params: tuple[Param, ...], ctx: ModuleContext) -> Function:
    """``fn`` with new params; every op keeps its names and attributes, its types re-inferred."""
    types = {p.name: p.type for p in params}
    ops = []
    for op in fn.ops:
        try:
            new_types = op.infer(tuple(types[o] for o in op.operands), ctx)
        except VerifyError as e:
            raise VerifyError(f"re-typing @{fn.name} %{op.result}: {e.message}") from None
        ops.append(op.with_(types=new_types))
        types.update(zip(op.results, new_types))
    return Function(fn.name, params, tuple(ops), fn.returns, tuple(types[r] for r in fn.returns), fn.entry)
