"""Rules of the pipeline ops (ir/pipeline_ops.py): the ``ppermute`` ring, the ``pipeline``
micro-batch schedule and the ``pipeline_generate`` schedule that keeps the pipeline full across
tokens (with ``sample``, ir/sample_ops.py), over the backend's axis_index, dynamic slices and
fori_loop, so the numpy SPMD simulator and the JAX lowering run the same schedules.

Each device runs the schedule of its own stage: at step t stage s takes micro-batch t - s
(stage 0 takes it from the op's input, the others from what the previous stage sent), runs the
stage body (its layers, then the ring ``ppermute``) and keeps the KV-cache rows it wrote only
when t - s is a real micro-batch (the other steps are the pipeline's bubbles). Stage 0 receives
the last stage's finished micro-batch t - (S - 1) and stores it. Micro-batch m is the same rows for
every operand however its B is sharded (``blocks``, ir/pipeline_ops.py), cut from each device's
own block without communication; every op of a layer is row-wise, so micro-batching gives the
unbatched result.
"""

from __future__ import annotations

import numpy as np

from runtime.kernels import rule


@rule("ppermute")
def _ppermute(op, xs, ts, be, interp):
    return (be.ppermute(xs[0], op.axes, op.shift),)


def _cutter(ts, blocks: int, M: int, be):
    """take(x, i, m) / put(x, i, m, part): micro-batch m's rows of operand i (typed ts[i]). Each
    operand's local B is viewed as [row blocks held here, M, rows of one micro-batch per block]
    (ir/pipeline_ops.py Pipeline.blocks), so every operand agrees on a micro-batch's rows."""
    bdim = [t.index("B") if t.has("B") else None for t in ts]
    held = [blocks // be.group_size(t.dim("B").axes) if t.has("B") else 0 for t in ts]

    def blocked(x, i):
        ax, shape = bdim[i], x.shape
        return x.reshape(shape[:ax] + (held[i], M, shape[ax] // (held[i] * M)) + shape[ax + 1:])

    def take(x, i, m):
        if bdim[i] is None:
            return x
        part = be.dynamic_slice(blocked(x, i), bdim[i] + 1, m, 1)
        shape = x.shape
        return part.reshape(shape[:bdim[i]] + (shape[bdim[i]] // M,) + shape[bdim[i] + 1:])

    def put(x, i, m, part):
        if bdim[i] is None:
            return part
        xb = blocked(x, i)
        pb = part.reshape(xb.shape[:bdim[i] + 1] + (1,) + xb.shape[bdim[i] + 2:])
        return be.dynamic_update_slice(xb, pb, bdim[i] + 1, m).reshape(x.shape)

    return take, put


@rule("pipeline")
def _pipeline(op, xs, ts, be, interp):
    xp = be.xp
    fn = interp.module.function(op.body.name)
    axes = (op.axis,)
    S, s, M = be.group_size(axes), be.axis_index(axes), op.microbatches
    n, k = len(xs), len(op.results) - 1
    take, put = _cutter(ts, op.blocks, M, be)

    def step(t, carry):
        state, out, *upd = carry
        fresh = take(xs[0], 0, xp.minimum(t, M - 1))
        inp = xp.where(s == 0, fresh, state)
        m = xp.clip(t - s, 0, M - 1)
        valid = (t - s >= 0) & (t - s < M)
        args = [inp] + [take(xs[i], i, m) for i in range(1, n - k)]
        olds = [take(u, n - k + j, m) for j, u in enumerate(upd)]
        sent, *new = interp.call(fn, (*args, *olds))
        upd = [put(u, n - k + j, m, xp.where(valid, nw, old)) for j, (u, nw, old) in enumerate(zip(upd, new, olds))]
        # what stage 0 receives now is the last stage's micro-batch t - (S - 1)
        done = t - (S - 1)
        slot = xp.clip(done, 0, M - 1)
        keep = (s == 0) & (done >= 0)
        out = put(out, 0, slot, xp.where(keep, sent, take(out, 0, slot)))
        return (sent, out, *upd)

    init = (xp.zeros_like(take(xs[0], 0, 0)), xp.zeros_like(xs[0]), *xs[n - k:])
    _, out, *upd = be.fori_loop(0, M + S - 1, step, init)
    return (out, *upd)


@rule("pipeline_generate")
def _pipeline_generate(op, xs, ts, be, interp):
    """DeepSpeed's generation schedule (ir/pipeline_ops.py PipelineGenerate): stage s works on
    item t - s = round r of micro-batch m at step t; stage 0 embeds the micro-batch's latest
    token, and the head turns what arrives back at stage 0 (the last stage's item t - (S - 1))
    into that micro-batch's next token, in time for its next round."""
    xp = be.xp
    mod = interp.module
    embed, body, head = (mod.function(f.name) for f in (op.embed, op.body, op.head))
    S, s, M, K = be.group_size((op.axis,)), be.axis_index((op.axis,)), op.microbatches, op.tokens
    slots = max(M, S)
    take, put = _cutter(ts, op.blocks, M, be)
    nw = 6 + op.embed_args
    ew, hw = xs[6:nw], xs[nw:nw + op.head_args]
    nw += op.head_args
    n, k = len(xs), len(op.results) - 1
    tokens, pos = xs[0], xs[1]

    def item(w):
        m, r = w % slots, w // slots
        return xp.clip(m, 0, M - 1), xp.clip(r, 0, K - 1), (w >= 0) & (m < M) & (r < K)

    def step(t, carry):
        recv, cur, out, *upd = carry
        m, r, valid = item(t - s)
        p = (take(pos, 1, m) + r).astype(pos.dtype)
        (x0,) = interp.call(embed, (take(cur, 0, m), p, *ew))
        inp = xp.where(s == 0, x0, recv)
        args = [take(xs[i], i, m) for i in range(nw, n - k)]
        olds = [take(u, n - k + j, m) for j, u in enumerate(upd)]
        sent, *new = interp.call(body, (inp, p, *args, *olds))
        upd = [put(u, n - k + j, m, xp.where(valid, nw_, old)) for j, (u, nw_, old) in enumerate(zip(upd, new, olds))]
        # what stage 0 receives now is the last stage's item t - (S - 1): its micro-batch's next token
        md, rd, done = item(t - (S - 1))
        pd = (take(pos, 1, md) + rd).astype(pos.dtype)
        (tok,) = interp.call(head, (sent, pd, *(take(xs[i], i, md) for i in range(2, 6)), *hw))
        keep = done & (s == 0)
        cur = put(cur, 0, md, xp.where(keep, tok, take(cur, 0, md)).astype(cur.dtype))
        line = take(out, 0, md)
        out = put(out, 0, md, xp.where(keep, be.dynamic_update_slice(line, tok.astype(out.dtype), 1, rd), line))
        return (sent, cur, out, *upd)

    x_t = embed.result_types[0]
    recv = xp.zeros(x_t.local_shape(be.mesh), be.float_dtype(x_t.dtype))
    out = xp.zeros((tokens.shape[0], K), tokens.dtype)
    steps = (K - 1) * slots + M + S - 1
    _, _, out, *upd = be.fori_loop(0, steps, step, (recv, tokens, out, *xs[n - k:]))
    return (out, *upd)


_JITTED: dict = {}


@rule("sample")
def _sample(op, xs, ts, be, interp):
    """runtime/sampling.py's token choice on [B, L, V] logits; the numpy backends take the
    argmax themselves and ask JAX only when some row samples (its PRNG is the reference)."""
    logits, pos, temp, top_k, top_p, seed = xs
    B, L, V = logits.shape
    if be.xp is np and (op.greedy or not np.any(temp > 0)):
        return (np.argmax(logits, axis=-1).astype(np.int32),)
    import jax
    import jax.numpy as jnp
    from jax import lax

    from runtime.sampling import sample

    if be.xp is np:  # eager calls: one compiled sampler, not a trace per call
        sample = _JITTED.setdefault("sample", jax.jit(sample, static_argnames="greedy_only"))

    def rows(a):
        return jnp.repeat(jnp.asarray(a), L, axis=0)

    seeds = lax.bitcast_convert_type(jnp.asarray(seed, jnp.int32), jnp.uint32)
    tok = sample(jnp.asarray(logits).reshape(B * L, V), rows(temp), rows(top_k), rows(top_p), rows(seeds),
                 jnp.asarray(pos).reshape(B * L) + op.offset, greedy_only=op.greedy).reshape(B, L)
    return (np.asarray(tok) if be.xp is np else tok,)
