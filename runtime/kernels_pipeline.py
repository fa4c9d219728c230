"""Rules of the pipeline ops (ir/pipeline_ops.py): the ``ppermute`` ring and the ``pipeline``
micro-batch schedule, over the backend's axis_index, dynamic slices and fori_loop, so the numpy
SPMD simulator and the JAX lowering run the same schedule.

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

from runtime.kernels import rule


@rule("ppermute")
def _ppermute(op, xs, ts, be, interp):
    return (be.ppermute(xs[0], op.axes, op.shift),)


@rule("pipeline")
def _pipeline(op, xs, ts, be, interp):
    xp = be.xp
    fn = interp.module.function(op.body.name)
    axes = (op.axis,)
    S, s, M = be.group_size(axes), be.axis_index(axes), op.microbatches
    n, k = len(xs), len(op.results) - 1
    bdim = [t.index("B") if t.has("B") else None for t in ts]
    # local row blocks of each operand (ir/pipeline_ops.py Pipeline.blocks): its B is viewed as
    # [blocks held here, M, rows of one micro-batch per block]
    held = [op.blocks // be.group_size(t.dim("B").axes) if t.has("B") else 0 for t in ts]

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
