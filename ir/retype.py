"""Re-typing functions whose params change: re-inference, and the walk that rewrites each
entry's scan bodies and then the entry, which passes that change weights share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from ir.builder import FunctionBuilder
from ir.errors import VerifyError
from ir.fusion_ops import Split
from ir.module import Function, Module, ModuleContext, Param
from ir.ops import Scan


@dataclass(frozen=True)
class ScanSite:
    """Where a scan body is called: the entry (before its rewrite), the scan op in it, and the
    body as it was."""

    entry: Function
    scan: Scan
    body: Function

    @property
    def received(self) -> dict[str, str]:
        """The entry value each body param receives, by body param name."""
        return {p.name: v for p, v in zip(self.body.params, self.scan.operands)}


#: Rewrites a scan body; gets the site that calls it and the context.
BodyRewrite = Callable[[Function, ScanSite, ModuleContext], Function]
EntryRewrite = Callable[[Function, ModuleContext], Function]


def rewrite_entries(module: Module, body: BodyRewrite, entry: EntryRewrite,
                    replaced: Mapping[str, Function] = {}) -> dict[str, Function]:
    """Every function of ``module`` by name, after ``body`` rewrote each entry's scan bodies and
    then ``entry`` the entry itself, each in a context holding what was rewritten before it (an
    entry's scan infers against its body's new signature). ``replaced`` seeds that context (a
    new @prepare); @prepare itself is the caller's."""
    fns = {f.name: f for f in module.functions} | dict(replaced)

    def ctx() -> ModuleContext:
        return ModuleContext(module.with_functions([*fns.values()]))

    for e in module.entries:
        for sc in [op for op in e.ops if isinstance(op, Scan)]:
            b = module.function(sc.body.name)
            fns[b.name] = body(b, ScanSite(e, sc, b), ctx())
        fns[e.name] = entry(e, ctx())
    return fns


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


def split_back(fn: Function, before: Function, ctx: ModuleContext, dims: Collection[str] | None = None) -> Function:
    """``fn`` with each result that grew (in ``dims``; any dim when None) split back to its size
    in ``before``, the padding dropped. A result typed like a cache param stays padded: it is
    the next step's state."""
    state = {p.type for p in fn.params if p.role == "cache"}
    b = FunctionBuilder.over(fn, ctx)
    b.ops.extend(fn.ops)
    rets = []
    for r, t, t0 in zip(fn.returns, fn.result_types, before.result_types):
        if t != t0 and t not in state:
            for d in [x.name for x in t.dims]:
                if (dims is None or d in dims) and t.size(d) != t0.size(d):
                    names = (b.namer.fresh(r), b.namer.fresh(r + "_pad"))
                    r = b.append(Split(results=names, operands=(r,), types=(), dim=d, names=d + d,
                                       sizes=(t0.size(d), t.size(d) - t0.size(d)), groups=1))[0]
                    t = b.types[r]
        rets.append(r)
    return Function(fn.name, fn.params, tuple(b.ops), tuple(rets), tuple(b.types[r] for r in rets), fn.entry)
