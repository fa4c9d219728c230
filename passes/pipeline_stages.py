"""``pipeline-stages``: splits the layer stack into contiguous stages over a new major mesh axis.

It runs last, on a module whose layouts (shard, insert-collectives, loops) were applied over the
other axes, so that inside a stage those layouts hold unchanged. For each entry:

* the stacked layer dim N of every weight and KV cache is sharded over the stage axis (stage s
  holds layers s*N/S ..); a layer count that does not divide is padded with identity layers
  (all-zero weights: a residual layer whose attention and MLP outputs are zero; the runtime
  zero-pads host weights, runtime/weights.py ``fit_to_params``);
* the layer ``scan`` becomes a ``pipeline`` op (ir/pipeline_ops.py) over a new stage body,
  ``@<entry>_stage``: the scan over this stage's layers followed by the ``ppermute`` that sends
  the activations to the next stage; an ``all_reduce`` over the stage axis then hands the last
  stage's output to every stage for the final norm and logits;
* the layer body works on one micro-batch: its B is the entry's batch over the entry's
  micro-batch count (``prefill``/``decode`` options: DeepSpeed Inference's hybrid schedule
  uses more, smaller micro-batches for the prompt than for generation).

The module's mesh gains the stage axis as its major axis, so on a multi-host mesh the stage
boundaries are the host boundaries and only the ppermute crosses the slow links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ir.builder import Namer
from ir.collectives import AllReduce
from ir.errors import LayoutError, PassError
from ir.module import Function, Module, ModuleContext, Param
from ir.ops import Op, Scan, Symbol
from ir.pipeline_ops import Pipeline, PipelineGenerate, Ppermute, stage_view
from ir.retype import reinfer
from ir.types import Dim, TensorType
from passes.base import Pass, PassResult
from passes.pipeline_generate import generation_entry
from passes.registry import register

STAGE_AXIS = "stage"


def stage_layers(layers: int, stages: int) -> tuple[int, int]:
    """(layers per stage, identity layers added) for ``layers`` over ``stages`` stages."""
    per = -(-layers // stages)
    return per, per * stages - layers


def auto_microbatches(batch: int, blocks: int, shards: int, stages: int, phase: str) -> int:
    """The hybrid schedule's micro-batch count: the largest M not above ``stages`` (decode) or
    ``4 * stages`` (prefill) that cuts ``batch`` into micro-batches of whole rows in each of the
    ``blocks`` row blocks and whose micro-batch still divides over the ``shards`` devices that
    shard B inside a layer."""
    cap = 4 * stages if phase == "prefill" else stages
    return max(d for d in range(1, min(batch, cap) + 1) if batch % (d * blocks) == 0 and (batch // d) % shards == 0)


def batch_shards(fn: Function, mesh: dict[str, int]) -> int:
    """The most devices any value of ``fn`` shards B over (its micro-batch must divide over them)."""
    return math.lcm(1, *(math.prod(mesh[a] for a in t.dim("B").axes) for t in fn.value_types.values() if t.has("B")))


def _micro(t: TensorType, m: int) -> TensorType:
    return TensorType(t.dtype, tuple(Dim("B", d.size // m, d.axes) if d.name == "B" else d for d in t.dims), t.partial)


def _staged(t: TensorType, padded: int, axis: str) -> TensorType:
    """A stacked [N, ...] type with N padded and sharded over the stage axis."""
    if not t.dims or t.dims[0].name != "N":
        return t
    return TensorType(t.dtype, (Dim("N", padded, (axis,)), *t.dims[1:]), t.partial)


@register
@dataclass(frozen=True)
class PipelineStages(Pass):
    """Options: ``stages`` (size of the new mesh axis), ``axis`` (its name), ``prefill`` and
    ``decode`` (micro-batches of the entry of that name; other entries take one). A count of 0
    is ``auto``, DeepSpeed Inference's hybrid schedule: decode takes as many micro-batches as
    there are stages (each stage works on a different micro-batch's token), prefill up to four
    times as many (bubble fraction (S-1)/(M+S-1) under 20%), each the largest count not above
    that which the batch allows (:func:`auto_microbatches`)."""

    stages: int = 2
    axis: str = STAGE_AXIS
    prefill: int = 1
    decode: int = 1
    #: > 0: the decode entry makes this many tokens per row in one call, with the pipeline kept
    #: full across tokens (passes/pipeline_generate.py); 0: one token's logits per call.
    tokens: int = 0
    #: With ``tokens``: every row is greedy (the program leaves out the sampling branch).
    greedy: int = 0
    name = "pipeline-stages"
    summary = "layer stack -> contiguous stages over a stage mesh axis, micro-batched, ppermute between stages"
    runs_after = ("shard", "insert-collectives", "cleanup", "collective-einsum")

    def run(self, module: Module) -> PassResult:
        if self.stages < 1:
            raise PassError(f"pipeline-stages needs stages >= 1, got {self.stages}")
        if self.tokens < 0 or self.greedy not in (0, 1):
            raise PassError(f"pipeline-stages tokens is >= 0 and greedy 0 or 1; got tokens={self.tokens}, "
                            f"greedy={self.greedy}")
        if self.prefill < 0 or self.decode < 0:
            raise PassError(f"pipeline-stages micro-batch counts are >= 1, or 0 for auto; got prefill={self.prefill}, "
                            f"decode={self.decode}")
        if self.axis in module.mesh_sizes:
            raise PassError(f"pipeline-stages adds mesh axis '{self.axis}', which the module already has "
                            f"({', '.join(a for a, _ in module.mesh)}); the layouts must not use it")
        staged = replace(module, mesh=((self.axis, self.stages), *module.mesh))
        fns = {f.name: f for f in module.functions}
        stats: dict[str, int] = {"stages": self.stages}
        for e in module.entries:
            scans = [op for op in e.ops if isinstance(op, Scan)]
            if len(scans) != 1:
                raise PassError(f"pipeline-stages expects one layer scan in @{e.name}, found {len(scans)}")
            sc = scans[0]
            if sc.carry != 1:
                raise PassError(f"pipeline-stages: the layer scan of @{e.name} carries {sc.carry} values, not 1")
            types = e.value_types
            blocks = math.lcm(*(math.prod(module.mesh_sizes[a] for a in types[o].dim("B").axes)
                                for o in sc.operands if types[o].has("B")))
            m = {"prefill": self.prefill, "decode": self.decode}.get(e.name, 1)
            shards = batch_shards(fns[sc.body.name], module.mesh_sizes)
            if m == 0:
                m = auto_microbatches(types[sc.operands[0]].size("B"), blocks, shards, self.stages, e.name)
            xs = [types[o] for o in sc.operands[sc.carry + sc.consts:]]
            layers = xs[0].size("N") if xs else 1
            per, pad = stage_layers(layers, self.stages)
            self._check_batch(e, types[sc.operands[0]], m, blocks, shards)
            layer = fns[sc.body.name]
            fns[layer.name] = reinfer(layer, tuple(replace(p, type=_micro(p.type, m)) for p in layer.params),
                                      ModuleContext(staged.with_functions([*fns.values()])))
            stacked = set(sc.operands[sc.carry + sc.consts:])
            params = tuple(replace(p, type=_staged(p.type, per * self.stages, self.axis)) if p.name in stacked else p
                           for p in e.params)
            stage_fn = self._stage_body(e, sc, params, m, fns[layer.name], staged, fns)
            fns[stage_fn.name] = stage_fn
            fns[e.name] = self._entry(e, sc, params, m, blocks, stage_fn, staged, fns)
            stats[f"@{e.name} micro-batches"] = m
            stats[f"@{e.name} schedule steps"] = m + self.stages - 1
            if e.name == "decode" and self.tokens > 0:
                steps = self._generation(fns, staged)
                stats["@decode tokens per call"] = self.tokens
                stats["@decode schedule steps"] = steps
            stats["layers per stage"] = per
            stats["identity layers added"] = pad
        prep = module.prepare
        if prep is not None:
            fns[prep.name] = self._prepare(prep, staged, fns, module)
        order = []
        for f in module.functions:
            order.append(fns[f.name])
            if f.entry:
                order.extend(fns[n] for n in (f"{f.name}_embed", f"{f.name}_stage", f"{f.name}_head") if n in fns)
        return PassResult(staged.with_functions(order), stats)

    def _check_batch(self, e: Function, x: TensorType, m: int, blocks: int, shards: int) -> None:
        """Micro-batches are cut from ``blocks`` row blocks (the operands' B shardings), and one
        must still divide over the ``shards`` devices that shard B inside a layer."""
        b = x.size("B")
        if b % m == 0 and (b // m) % shards:
            raise LayoutError(f"@{e.name}: a micro-batch of {b // m} rows ({b} in {m}) does not divide over the "
                              f"{shards} devices that shard the batch inside a layer",
                              hint="choose fewer micro-batches (serve.microbatches) or auto")
        if b % (m * blocks):
            raise LayoutError(f"@{e.name}: batch {b} does not split into {m} micro-batches"
                              + (f" in each of {blocks} row blocks (B is sharded over {blocks} devices)"
                                 if blocks > 1 else ""),
                              hint="choose serve.microbatches counts that divide the batch (or auto)")

    def _stage_body(self, e: Function, sc: Scan, params: tuple[Param, ...], m: int, layer: Function,
                    staged: Module, fns: dict[str, Function]) -> Function:
        ptypes = {p.name: p.type for p in params}
        types = e.value_types
        ins = [ptypes.get(o, types[o]) for o in sc.operands]
        view = [stage_view(t, self.axis, self.stages, m) for t in ins]
        names = [p.name for p in layer.params]
        bparams = tuple(Param(n, t, "arg", p.kind) for n, t, p in zip(names, view, layer.params))
        namer = Namer(set(names))
        ctx = ModuleContext(staged.with_functions([*fns.values()]))
        probe = Scan(results=tuple(namer.fresh(r) for r in sc.results), operands=tuple(names), types=(),
                     body=Symbol(layer.name), carry=sc.carry, consts=sc.consts)
        scan = probe.with_(types=probe.infer(tuple(view), ctx))
        sent = namer.fresh("x_next")
        perm = Ppermute(results=(sent,), operands=(scan.results[0],), types=(scan.types[0],), axes=(self.axis,),
                        shift=1, reason="pipeline: activations to the next stage")
        rets = (sent, *scan.results[1:])
        rtypes = (scan.types[0], *scan.types[1:])
        return Function(f"{e.name}_stage", bparams, (scan, perm), rets, rtypes)

    def _entry(self, e: Function, sc: Scan, params: tuple[Param, ...], m: int, blocks: int, stage_fn: Function,
               staged: Module, fns: dict[str, Function]) -> Function:
        namer = Namer(set(e.value_types))
        reason = "pipeline: the last stage's activations to every stage"
        # A prefill that keeps only its last position splits it off next: the split is linear, so it
        # takes the partial sum and only the last position crosses the (slow) stage links.
        used = {o for op in e.ops for o in op.operands} | set(e.returns)
        readers = [op for op in e.ops if sc.results[0] in op.operands]
        late = (readers[0] if len(readers) == 1 and readers[0].kind == "split" and sc.results[0] not in e.returns
                and not any(r in used for r in readers[0].results[:-1]) else None)
        target = late.results[-1] if late is not None else sc.results[0]
        partial = namer.fresh(target + "_staged")
        ops: list[Op] = []
        for op in e.ops:
            if op is sc:
                first = sc.results[0] if late is not None else partial
                ops.append(Pipeline(results=(first, *sc.results[1:]), operands=sc.operands, types=(),
                                    body=Symbol(stage_fn.name), axis=self.axis, microbatches=m, blocks=blocks))
            elif op is late:
                ops.append(op.with_(results=(*op.results[:-1], partial)))
            else:
                ops.append(op)
            if op is (late if late is not None else sc):
                ops.append(AllReduce(results=(target,), operands=(partial,), types=(), axes=(self.axis,),
                                     reason=reason))
        ctx = ModuleContext(staged.with_functions([*fns.values()]))
        return reinfer(e.with_ops(ops), params, ctx)

    def _generation(self, fns: dict[str, Function], staged: Module) -> int:
        """The decode entry as the K-token generation schedule (passes/pipeline_generate.py);
        returns its schedule length in stage steps."""
        entry, embed, head = generation_entry(fns["decode"], self.axis, self.stages, self.tokens, bool(self.greedy),
                                              ModuleContext(staged.with_functions([*fns.values()])))
        fns[embed.name], fns[head.name] = embed, head
        fns["decode"] = reinfer(entry, entry.params, ModuleContext(staged.with_functions([*fns.values()])))
        gen = next(op for op in entry.ops if isinstance(op, PipelineGenerate))
        return gen.steps(self.stages)

    def _prepare(self, prep: Function, staged: Module, fns: dict[str, Function], module: Module) -> Function:
        """@prepare's stacked params take the padded, stage-sharded N of the entries' weights."""
        want = {p.name: p.type for p in fns[module.entries[0].name].params_with_role("weight")}
        per = next((t.size("N") for t in want.values() if t.dims and t.dims[0].name == "N"), None)
        params = tuple(replace(p, type=_staged(p.type, per, self.axis)) if per else p for p in prep.params)
        out = reinfer(prep, params, ModuleContext(staged.with_functions([*fns.values()])))
        got = dict(zip(want, out.result_types))
        bad = [n for n, t in want.items() if got.get(n) != t]
        if bad:
            raise PassError(f"pipeline-stages: @prepare does not give the staged weights {', '.join(bad)}")
        return out
