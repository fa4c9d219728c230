"""Pipeline parallelism in the IR: ``ppermute`` (a collective-permute ring over mesh axes) and
``pipeline`` (the micro-batch schedule that applies a stage body on every stage of a mesh axis).

The layer stack is split into contiguous stages by sharding the stacked layer dim N over the
stage axis: stage s holds layers s*N/S .. (s+1)*N/S - 1 of every stacked weight and KV cache.
``pipeline`` runs the schedule of GPipe (and DeepSpeed Inference's per-phase micro-batch
counts): its operands' batch dim B is cut into ``microbatches`` micro-batches; at step t stage s
works on micro-batch t - s, so M micro-batches take M + S - 1 steps. Its body sees one stage and
one micro-batch (B/M rows, N/S layers, unsharded N) and ends with the ``ppermute`` that hands its
activations to the next stage: the only inter-stage traffic, explicit so that the ledger and
the cost model see it. The ring is cyclic, so the last stage's output arrives at stage 0, which
collects it; the op's first result is therefore a partial sum over the stage axis (stage 0
holds it, the others zeros) that an ``all_reduce`` hands to every stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ir.ops import InferContext, Op, Symbol, fail, op_kind, require_not_partial
from ir.types import Dim, TensorType


@op_kind("ppermute")
@dataclass(frozen=True, kw_only=True)
class Ppermute(Op):
    """Every device sends its block to the device ``shift`` places after it in the ring of
    ``axes`` (composite order, major first; cyclic). The type is unchanged: the values move."""

    axes: tuple[str, ...]
    shift: int = 1
    #: Why the collective exists, for the ledger.
    reason: str = ""
    arity = (1, 1)
    is_collective = True

    def infer(self, ins, ctx):
        from ir.collectives import _check_axes

        (x,) = ins
        _check_axes("ppermute", self.axes, ctx.mesh)
        if set(self.axes) & x.mesh_axes:
            raise fail(f"ppermute over {{{','.join(self.axes)}}}: the operand is sharded or partial over "
                       "some of those axes (a ring moves whole blocks between replicas)")
        return (x,)


def stage_view(t: TensorType, axis: str, stages: int, microbatches: int) -> TensorType:
    """What one stage body sees of a pipeline operand: B cut into micro-batches, and a leading N
    sharded over ``axis`` reduced to this stage's layers (unsharded)."""
    dims = []
    for i, d in enumerate(t.dims):
        if d.name == "B":
            if d.size % microbatches:
                raise fail(f"pipeline: batch {d.size} does not split into {microbatches} micro-batches")
            d = Dim("B", d.size // microbatches, d.axes)
        if axis in d.axes:
            if i != 0 or d.name != "N" or d.axes != (axis,):
                raise fail(f"pipeline: only a leading layer dim N may be sharded over the stage axis "
                           f"'{axis}', got {t}")
            d = Dim("N", d.size // stages)
        dims.append(d)
    return TensorType(t.dtype, tuple(dims), t.partial)


def check_row_blocks(kind: str, ins: tuple[TensorType, ...], ctx: InferContext, blocks: int,
                     microbatches: int) -> None:
    """Every operand with a batch dim must cut into the same micro-batch rows on every device:
    ``blocks`` a multiple of B's shards, B a multiple of ``blocks * microbatches`` (shared by
    ``pipeline`` and ``pipeline_generate``, whose schedules slice rows the same way)."""
    for t in ins:
        if t.has("B"):
            k = math.prod(ctx.mesh[a] for a in t.dim("B").axes)
            if blocks % k or t.size("B") % (blocks * microbatches):
                raise fail(f"{kind}: B of {t} does not cut into {microbatches} micro-batches over "
                           f"{blocks} row blocks (blocks must be a multiple of B's {k} shards)")


@op_kind("pipeline")
@dataclass(frozen=True, kw_only=True)
class Pipeline(Op):
    """Runs ``body`` on every stage of mesh axis ``axis`` over ``microbatches`` micro-batches.

    Operand 0 is the activation that flows from stage to stage (replicated over ``axis``); the
    others are passed as :func:`stage_view` says (micro-batch rows of B, this stage's layers of
    an N sharded over ``axis``). The body returns the activation for the next stage (after its
    ``ppermute``) followed by updates of the *last* k operands (the KV caches' micro-batch
    rows). Results: the last stage's activations, as a partial sum over ``axis``, and the k
    updated operands."""

    body: Symbol
    axis: str
    microbatches: int
    #: Row blocks that define the micro-batches: micro-batch m is rows m*r .. (m+1)*r - 1 of each
    #: of the B/blocks-row blocks of B (r = B / (blocks * microbatches)). A multiple of every
    #: operand's B sharding, so each device cuts its micro-batch rows from its own block without
    #: communication and operands sharded differently agree on which rows a micro-batch holds.
    blocks: int = field(default=1, metadata={"omit_default": True})
    arity = (1, None)

    def infer(self, ins, ctx):
        fn = ctx.function(self.body.name)
        if self.axis not in ctx.mesh:
            raise fail(f"pipeline over mesh axis '{self.axis}', which the mesh lacks")
        if self.microbatches < 1:
            raise fail(f"pipeline needs at least one micro-batch, got {self.microbatches}")
        stages = ctx.mesh[self.axis]
        x = ins[0]
        require_not_partial("pipeline", x)
        if self.axis in x.mesh_axes:
            raise fail(f"pipeline: the activation must be replicated over '{self.axis}', got {x}")
        check_row_blocks("pipeline", ins, ctx, self.blocks, self.microbatches)
        expect = tuple(stage_view(t, self.axis, stages, self.microbatches) for t in ins)
        got = tuple(p.type for p in fn.params)
        if expect != got:
            raise fail(f"pipeline: body @{fn.name} takes ({', '.join(map(str, got))}) but is given "
                       f"({', '.join(map(str, expect))})")
        outs = fn.result_types
        k = len(outs) - 1
        if k < 0 or k > len(ins) - 1 or outs[0] != expect[0]:
            raise fail(f"pipeline: body @{fn.name} must return the next stage's activation ({expect[0]}) "
                       "followed by updates of the last operands")
        if k and outs[1:] != expect[len(ins) - k:]:
            raise fail(f"pipeline: body @{fn.name} returns ({', '.join(map(str, outs[1:]))}) but its last "
                       f"{k} operands are ({', '.join(map(str, expect[len(ins) - k:]))})")
        return (x.with_partial({self.axis}), *ins[len(ins) - k:])

    def steps(self, stages: int) -> int:
        """Schedule length: every stage runs its body this many times per call."""
        return self.microbatches + stages - 1


#: Operands of ``pipeline_generate`` before the weights: per-row tokens, positions and sampling.
GENERATE_ROWS = ("tokens", "pos", "temperature", "top_k", "top_p", "seed")


@op_kind("pipeline_generate")
@dataclass(frozen=True, kw_only=True)
class PipelineGenerate(Op):
    """DeepSpeed Inference's generation schedule: ``tokens`` new tokens for every row with the
    pipeline kept full across tokens.

    Work item w = r * slots + m (slots = max(M, S)) is round r of micro-batch m; stage s works on
    item t - s at step t, so every stage holds a different micro-batch's token in every step. At
    stage 0 an item starts with ``embed`` on its micro-batch's latest token; its activation
    passes the ``body`` of each stage (the layers, then the ring ``ppermute``); when the last
    stage's output arrives back at stage 0 (the same step), ``head`` turns it into the next
    token (final norm, logits, sampling), which is that micro-batch's input for its next round.
    With M >= S the token is there exactly when the micro-batch's next item is due: no bubble
    but the fill and drain of the whole call, (tokens - 1) * slots + M + S - 1 steps.

    Operands: the six per-row values of :data:`GENERATE_ROWS` (tokens and positions [B, L=1],
    sampling parameters [B]), ``embed_args`` weights of ``embed``, ``head_args`` weights of
    ``head``, then the body's operands after its activation and positions (stacked weights,
    KV caches; the last k are updated). Bodies: ``embed(tokens, pos, w...) -> x``,
    ``body(x, pos, ...) -> (x_next, k updates)`` as for ``pipeline``, ``head(x, pos,
    temperature, top_k, top_p, seed, w...) -> token [B, L=1]``. Results: the new tokens
    [B, L=tokens] as a partial sum over ``axis`` (stage 0 holds them), and the k updates."""

    embed: Symbol
    body: Symbol
    head: Symbol
    axis: str
    microbatches: int
    tokens: int
    embed_args: int
    head_args: int
    blocks: int = field(default=1, metadata={"omit_default": True})
    arity = (6, None)

    def infer(self, ins, ctx):
        if self.axis not in ctx.mesh:
            raise fail(f"pipeline_generate over mesh axis '{self.axis}', which the mesh lacks")
        if self.microbatches < 1 or self.tokens < 1:
            raise fail(f"pipeline_generate needs micro-batches and tokens >= 1, got {self.microbatches} and "
                       f"{self.tokens}")
        stages = ctx.mesh[self.axis]
        nw = 6 + self.embed_args + self.head_args
        if len(ins) < nw:
            raise fail(f"pipeline_generate: {len(ins)} operands, fewer than the {nw} rows and weights")
        for t in ins[:6]:
            require_not_partial("pipeline_generate", t)
            if t.mesh_axes or not t.has("B"):
                raise fail(f"pipeline_generate: the per-row operands must be replicated with a B dim, got {t}")
        check_row_blocks("pipeline_generate", ins, ctx, self.blocks, self.microbatches)
        view = [stage_view(t, self.axis, stages, self.microbatches) for t in ins]
        rows, ew = view[:6], view[6:6 + self.embed_args]
        hw, rest = view[6 + self.embed_args:nw], view[nw:]
        emb = self._fn(ctx, self.embed, (rows[0], rows[1], *ew))
        if len(emb.result_types) != 1:
            raise fail(f"pipeline_generate: @{emb.name} must return one activation")
        x = emb.result_types[0]
        body = self._fn(ctx, self.body, (x, rows[1], *rest))
        outs = body.result_types
        k = len(outs) - 1
        if k < 0 or k > len(rest) or outs[0] != x or (k and outs[1:] != tuple(rest[len(rest) - k:])):
            raise fail(f"pipeline_generate: @{body.name} must return the next stage's activation ({x}) "
                       "followed by updates of the last operands")
        head = self._fn(ctx, self.head, (x, *rows[1:], *hw))
        if head.result_types != (rows[0],):
            raise fail(f"pipeline_generate: @{head.name} must return one token per row ({rows[0]}), "
                       f"got ({', '.join(map(str, head.result_types))})")
        tok = ins[0]
        out = TensorType(tok.dtype, (tok.dims[0], Dim("L", self.tokens)), frozenset({self.axis}))
        return (out, *ins[len(ins) - k:])

    @staticmethod
    def _fn(ctx, sym: Symbol, expect: tuple[TensorType, ...]):
        fn = ctx.function(sym.name)
        got = tuple(p.type for p in fn.params)
        if got != expect:
            raise fail(f"pipeline_generate: @{fn.name} takes ({', '.join(map(str, got))}) but is given "
                       f"({', '.join(map(str, expect))})")
        return fn

    def slots(self, stages: int) -> int:
        """Items per round: a micro-batch's next token is due ``slots`` steps after its last."""
        return max(self.microbatches, stages)

    def steps(self, stages: int) -> int:
        """Schedule length: every stage runs its bodies this many times per call."""
        return generate_steps(self.tokens, self.microbatches, stages)


def generate_steps(tokens: int, microbatches: int, stages: int) -> int:
    """Stage steps of ``pipeline_generate``: the last micro-batch's last token leaves the last
    stage at step (tokens - 1) * max(M, S) + M + S - 2."""
    return (tokens - 1) * max(microbatches, stages) + microbatches + stages - 1
