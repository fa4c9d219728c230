"""The decode entry of a pipelined module as DeepSpeed Inference's generation schedule.

``pipeline-stages{tokens=K}`` calls :func:`generation_entry` on the decode entry it has just
staged (embed ops, ``pipeline``, the all_reduce of the last stage's output, final norm and
logits). It outlines the ops before the pipeline into ``@decode_embed`` and the ops after it
into ``@decode_head`` (which gains the collectives that make the logits whole and a ``sample``
op), and replaces them with one ``pipeline_generate`` op (ir/pipeline_ops.py) that makes K
tokens per row with the pipeline kept full across tokens: the token is chosen where it
re-enters stage 0, inside the schedule, instead of by the host between calls.

The new entry takes the per-row sampling parameters as inputs and returns the tokens [B, L=K]
instead of the logits; weights and KV caches are the decode entry's, so a runner shares them.
"""

from __future__ import annotations

from dataclasses import replace

from ir.builder import FunctionBuilder, Namer
from ir.collectives import AllGather, AllReduce
from ir.errors import PassError
from ir.module import Function, ModuleContext, Param
from ir.ops import Op, Symbol
from ir.pipeline_ops import GENERATE_ROWS, Pipeline, PipelineGenerate, stage_view
from ir.retype import reinfer
from ir.sample_ops import Sample
from ir.types import Dim, TensorType

REASON = "pipeline: the new tokens to every stage"


def _free(ops: list[Op] | tuple[Op, ...], defined: set[str]) -> set[str]:
    """Operands of ``ops`` that none of them (nor ``defined``) produces."""
    made, out = set(defined), set()
    for op in ops:
        out |= {o for o in op.operands if o not in made}
        made |= set(op.results)
    return out


def _whole(b: FunctionBuilder, v: str, why: str) -> str:
    """``v`` summed and gathered until it is whole on every device of the stage."""
    t = b.types[v]
    if t.partial:
        v = b.emit(AllReduce, [v], v, axes=tuple(sorted(t.partial)), reason=why)
    for d in b.types[v].dims:
        if d.axes:
            v = b.emit(AllGather, [v], v, axes=d.axes, dim=d.name, reason=why)
    return v


def generation_entry(e: Function, axis: str, stages: int, tokens: int, greedy: bool,
                     ctx: ModuleContext) -> tuple[Function, Function, Function]:
    """(the K-token entry, ``@<entry>_embed``, ``@<entry>_head``) for a staged decode entry; the
    caller re-infers the entry's types in a module that holds the two new functions."""
    idx = [i for i, op in enumerate(e.ops) if isinstance(op, Pipeline)]
    if len(idx) != 1 or idx[0] + 1 >= len(e.ops) or not isinstance(e.ops[idx[0] + 1], AllReduce):
        raise PassError(f"pipeline-stages tokens: @{e.name} has no pipeline followed by its all_reduce")
    i = idx[0]
    pl: Pipeline = e.ops[i]  # type: ignore[assignment]
    ar = e.ops[i + 1]
    pre, post = list(e.ops[:i]), list(e.ops[i + 2:])
    inputs = [p for p in e.params if p.role == "input"]
    pos = pl.operands[1] if len(pl.operands) > 1 else ""
    toks = [p for p in inputs if p.name != pos]
    if len(inputs) != 2 or len(toks) != 1 or e.param(pos).role != "input":
        raise PassError(f"pipeline-stages tokens: @{e.name}'s layers must take its positions input second")
    if tuple(e.returns[1:]) != tuple(pl.results[1:]):
        raise PassError(f"pipeline-stages tokens: @{e.name} must return the logits and the pipeline's caches")
    weights = [p for p in e.params if p.role == "weight"]
    M = pl.microbatches

    def view(p: Param, role: str = "arg") -> Param:
        return Param(p.name, stage_view(p.type, axis, stages, M), role, p.kind)

    x_type = stage_view(e.value_types[pl.operands[0]], axis, stages, M)
    # @embed: the ops before the pipeline, on one micro-batch
    free = _free(pre, set())
    ew = [p for p in weights if p.name in free]
    eparams = (view(toks[0]), view(e.param(pos)), *(view(p) for p in ew))
    embed = reinfer(Function(f"{e.name}_embed", eparams, tuple(pre), (pl.operands[0],), ()), eparams, ctx)
    if embed.result_types != (x_type,):
        raise PassError(f"pipeline-stages tokens: @{embed.name} gives {embed.result_types}, the stages take {x_type}")
    # @head: the ops after the all_reduce, then whole logits and the sample op
    free = _free(post, {ar.results[0]})
    hw = [p for p in weights if p.name in free]
    n = Namer({p.name for p in e.params} | set(e.value_types))
    samp = {r: n.fresh(r) for r in GENERATE_ROWS[2:]}
    b_type = e.param(toks[0].name).type.dims[0]
    row_types = {"temperature": "f32", "top_k": "i32", "top_p": "f32", "seed": "i32"}
    samp_params = [Param(samp[r], TensorType(row_types[r], (Dim("B", b_type.size),)), "input") for r in samp]
    hparams = (Param(ar.results[0], x_type), view(e.param(pos)), *(view(p) for p in samp_params),
               *(view(p) for p in hw))
    body = reinfer(Function(f"{e.name}_head", hparams, tuple(post), (e.returns[0],), ()), hparams, ctx)
    hb = FunctionBuilder.over(body, ctx)
    hb.ops.extend(body.ops)
    logits = _whole(hb, e.returns[0], "sample: every row's whole vocabulary")
    tok = hb.emit(Sample, [logits, pos, *samp.values()], "token", offset=1, greedy=greedy)
    head = hb.finish([_whole(hb, tok, "sample: the token on every device of the stage")])
    # the entry: one pipeline_generate and the all_reduce that hands its tokens to every stage
    nb = Namer(set(e.value_types) | set(samp.values()))
    part, out = nb.fresh("generated_staged"), nb.fresh("generated")
    rows = (toks[0].name, pos, *samp.values())
    gen = PipelineGenerate(results=(part, *pl.results[1:]), operands=(*rows, *(p.name for p in ew),
                           *(p.name for p in hw), *pl.operands[2:]), types=(),
                           embed=Symbol(embed.name), body=pl.body, head=Symbol(head.name), axis=axis,
                           microbatches=M, tokens=tokens, embed_args=len(ew), head_args=len(hw), blocks=pl.blocks)
    gather = AllReduce(results=(out,), operands=(part,), types=(), axes=(axis,), reason=REASON)
    at = max(i for i, p in enumerate(e.params) if p.role == "input") + 1
    params = (*e.params[:at], *samp_params, *e.params[at:])
    entry = replace(e.with_ops((gen, gather), (out, *e.returns[1:])), params=params)
    return entry, embed, head  # the entry's types are inferred once embed and head are in the module
