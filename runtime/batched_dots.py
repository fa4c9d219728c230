"""Two-operand einsums with batch dims (attention) as one canonical ``dot_general``.

Given ``BLKGD,BTKD->BKGLT`` (attention scores) or ``BKGLT,BTKD->BLKGD`` (probs times values),
``jnp.einsum`` hands XLA a dot whose free dims come out in operand order, followed by a
transpose. XLA's CPU layout assignment then picked layouts that made the [K, G, L, T] score
tensor of a 512-token prefill come out T-major: two transposing copies of the largest tensor of
the layer (score + mask, and the probabilities before the second dot) and a transposed attention
output, about a third of SmolLM2's prefill. Here the operands are transposed explicitly to
``[batch, free, contracted]`` (the contracted dims kept on the side of the free ones that they
already are, so a K/V cache is read along its rows) with each side's free dims ordered as in the
larger of (that operand, the output): the big tensor is never transposed, only the small ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plan(spec: str) -> tuple[str, str, str, str, str] | None:
    """(batch, lhs free, rhs free, contracted, output) letters of a two-operand einsum with
    every letter either in both operands or in the output (no letter summed within one
    operand, none repeated); None for another einsum."""
    ins, out = spec.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    if any(c not in b and c not in out for c in a) or any(c not in a and c not in out for c in b):
        return None
    if any(c not in a and c not in b for c in out):
        return None
    batch = "".join(c for c in out if c in a and c in b)
    contract = "".join(c for c in a if c in b and c not in out)
    return batch, "".join(c for c in a if c not in b), "".join(c for c in b if c not in a), contract, out


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def batched_einsum(spec: str, x: Any, y: Any, precision: Any) -> Any | None:
    """``einsum(spec, x, y)`` as transposes of the smaller tensors around one ``dot_general``
    ``[batch, lhs free, C] x [batch, C, rhs free]`` (or ``[batch, rhs free, C]`` when ``y``
    holds its contracted dims last); None when ``spec`` is not such an einsum (no batch dim)."""
    import jax.numpy as jnp
    from jax import lax

    p = plan(spec)
    if p is None:
        return None
    batch, lf, rf, contract, out = p
    if not batch or not contract:
        return None
    a, b = spec.split("->")[0].split(",")
    dims = {**dict(zip(a, x.shape)), **dict(zip(b, y.shape))}
    out_size = _size(tuple(dims[c] for c in out))
    # each side's free dims: in the operand's order when it is larger than the output, else the output's
    lf = lf if _size(x.shape) >= out_size else "".join(c for c in out if c in lf)
    rf = rf if _size(y.shape) >= out_size else "".join(c for c in out if c in rf)
    batch = batch if _size(x.shape) >= out_size else "".join(c for c in out if c in batch)
    c_last = b.index(contract[-1]) > max((b.index(c) for c in rf), default=-1)
    xl = batch + lf + contract
    yl = batch + (rf + contract if c_last else contract + rf)
    xt = _transpose(x, a, xl)
    yt = _transpose(y, b, yl)
    nb = len(batch)
    shape = [dims[c] for c in batch]
    n_lf, n_rf, n_c = _size(tuple(dims[c] for c in lf)), _size(tuple(dims[c] for c in rf)), _size(tuple(dims[c] for c in contract))
    x3 = xt.reshape(*shape, n_lf, n_c)
    y3 = yt.reshape(*shape, n_rf, n_c) if c_last else yt.reshape(*shape, n_c, n_rf)
    bd = tuple(range(nb))
    r = lax.dot_general(x3, y3, (((nb + 1,), (nb + 1 if c_last else nb,)), (bd, bd)), precision=precision,
                        preferred_element_type=jnp.result_type(x.dtype, y.dtype))
    r = r.reshape(*shape, *[dims[c] for c in lf], *[dims[c] for c in rf])
    return _transpose(r, batch + lf + rf, out)


def _transpose(x: Any, have: str, want: str) -> Any:
    return x if have == want else x.transpose([have.index(c) for c in want])


#: Off: attention einsums go to ``jnp.einsum`` as before (for A/B benchmarks).
ENABLED = True
