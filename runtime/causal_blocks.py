"""Causal attention in query blocks that skip fully masked key blocks (JAX lowering of prefill).

The IR's attention is five ops: scores einsum, scale, causal_mask, softmax, values einsum. A
prefill of L tokens computes the whole [.., L, T] score tensor although the causal mask hides
about half of it. While a program is traced, :class:`AttentionChain` remembers where each of
those values came from; when the values einsum reads probabilities that came down that chain
it computes the attention again in ``BLOCKS`` query blocks, block i against the keys
``[0, (i+1) L / BLOCKS)`` only, through the same rules on sliced operands, so the full tensors
are left unused (XLA drops them). Positions are data, so the blocked form is taken under
``lax.cond`` only when every query position lies below its block's key bound (a prompt that
fills its bucket from position 0, as a prefill from an empty cache does); otherwise (rows
padded in front, a chunk after cached positions) the whole computation runs as before. The
blocked rows differ from the whole ones only by exact zeros left out of the two sums.
"""

from __future__ import annotations

from typing import Any

#: Query blocks of a blocked prefill attention (1: off).
BLOCKS = 8
#: Blocked only from this many query columns on.
MIN_L = 256


class AttentionChain:
    """Provenance of traced attention values: scores -> scaled -> masked -> probs."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, ...]] = {}

    def note(self, value: Any, kind: str, *what: Any) -> None:
        self._seen[id(value)] = (value, kind, *what)

    def get(self, value: Any, kind: str) -> tuple[Any, ...] | None:
        """What ``value`` was made from when it is a ``kind`` value, else None."""
        hit = self._seen.get(id(value))
        return hit[2:] if hit is not None and hit[0] is value and hit[1] == kind else None


def noted_rules(rules: dict, chain: AttentionChain) -> dict:
    """``rules`` with scale, causal_mask and softmax remembering their operand's provenance."""
    out = dict(rules)

    def scale(op, xs, ts, be, interp):
        r = rules["scale"](op, xs, ts, be, interp)
        src = chain.get(xs[0], "scores")
        if src is not None:
            chain.note(r[0], "scaled", xs[0], op, ts)
        return r

    def mask(op, xs, ts, be, interp):
        r = rules["causal_mask"](op, xs, ts, be, interp)
        src = chain.get(xs[0], "scaled")
        if src is not None:
            chain.note(r[0], "masked", xs[0], op, ts, xs[1])
        return r

    def softmax(op, xs, ts, be, interp):
        r = rules["softmax"](op, xs, ts, be, interp)
        src = chain.get(xs[0], "masked")
        if src is not None and op.dim == "T":
            chain.note(r[0], "probs", xs[0], op, ts)
        return r

    out.update(scale=scale, causal_mask=mask, softmax=softmax)
    return out


def blocked_values(chain: AttentionChain, spec: str, probs: Any, v: Any, whole: Any, be: Any, rules: dict) -> Any:
    """``whole`` (the values einsum over the full probabilities), or, when ``probs`` came down
    the chain of a prefill, ``lax.cond`` between the blocked attention and ``whole``."""
    import jax.numpy as jnp
    from jax import lax

    p = chain.get(probs, "probs")
    if p is None or BLOCKS < 2:
        return whole
    (masked, sm_op, sm_ts) = p
    m = chain.get(masked, "masked")
    if m is None:
        return whole
    scaled, mk_op, mk_ts, pos = m
    s = chain.get(scaled, "scaled")
    if s is None:
        return whole
    scores, sc_op, sc_ts = s
    src = chain.get(scores, "scores")
    if src is None:
        return whole
    (q, k, s_spec, einsum), = src
    qs, ks = s_spec.split("->")[0].split(",")
    ps, vs = spec.split("->")[0].split(",")
    if "L" not in qs or "T" not in ks or "T" not in vs or "L" not in spec.split("->")[1] or pos.ndim != 2:
        return whole
    L, T = q.shape[qs.index("L")], k.shape[ks.index("T")]
    if L < MIN_L or L % BLOCKS or T < L or pos.shape[1] != L:
        return whole
    bl = L // BLOCKS
    col = jnp.arange(L) // bl
    ok = jnp.all(pos < ((col + 1) * bl)[None, :])

    def blocked(q, k, v, pos):
        outs = []
        for i in range(BLOCKS):
            qi = lax.slice_in_dim(q, i * bl, (i + 1) * bl, axis=qs.index("L"))
            ki = lax.slice_in_dim(k, 0, (i + 1) * bl, axis=ks.index("T"))
            vi = lax.slice_in_dim(v, 0, (i + 1) * bl, axis=vs.index("T"))
            pi = lax.slice_in_dim(pos, i * bl, (i + 1) * bl, axis=1)
            sc = einsum(s_spec, qi, ki)
            sc = rules["scale"](sc_op, [sc], sc_ts, be, None)[0]
            sc = rules["causal_mask"](mk_op, [sc, pi], mk_ts, be, None)[0]
            pr = rules["softmax"](sm_op, [sc], sm_ts, be, None)[0]
            outs.append(einsum(spec, pr, vi))
        return jnp.concatenate(outs, axis=spec.split("->")[1].index("L"))

    def full(q, k, v, pos):
        sc = einsum(s_spec, q, k)
        sc = rules["scale"](sc_op, [sc], sc_ts, be, None)[0]
        sc = rules["causal_mask"](mk_op, [sc, pos], mk_ts, be, None)[0]
        pr = rules["softmax"](sm_op, [sc], sm_ts, be, None)[0]
        return einsum(spec, pr, v)

    return lax.cond(ok, blocked, full, q, k, v, pos)
