"""An f32 projection of a few rows, computed as the weight times the activation's transpose.

XLA's CPU backend hands f32 dots to YNNPACK. For ``x[P, C] @ w[Q, C].T`` with 2 <= P <= 16 rows
(a decode step at batch 2..16) its kernel runs at about half the weight's memory bandwidth:
the few activation rows are the matrix it streams and the big weight is the one it packs.
Written as ``w[Q, C] . x[P, C] -> [Q, P]``, the weight is the streamed side and the product is
transposed back (P x Q floats, small): a 30-layer 576 x 1536 chain at P = 8 ran 1.28x faster
(19.1 -> 15.0 ms, quiet machine; P = 2, 4, 16 1.15-1.23x; P = 32 even, P >= 64 and prefill
slower, so those keep the plain dot). XLA's algebraic simplifier folds ``dot(w, x).T`` back
into ``dot(x, w)``, so the ``[Q, P]`` product is first computed into its own buffer
(:func:`runtime.lower_jax.materialized`'s exact ``+ 0``). The same products, summed by another
kernel: equal within f32 rounding (the greedy-token tests against transformers hold).
"""

from __future__ import annotations

from typing import Any, Callable

from jax import lax

#: rows for which the weight-first form is used (inclusive); measured, see the docstring
MIN_ROWS, MAX_ROWS = 2, 16

#: a switch for A/B measurements (bench scripts); on by default
ENABLED = True


def rows_dot(x: Any, w: Any, precision: Any, materialize: Callable[[Any], Any]) -> Any:
    """``x[P, C] @ w[Q, C].T`` (f32, both contracting their last dim) as ``[P, Q]``."""
    dims = (((1,), (1,)), ((), ()))
    if ENABLED and MIN_ROWS <= x.shape[0] <= MAX_ROWS:
        return materialize(lax.dot_general(w, x, dims, precision=precision)).T
    return lax.dot_general(x, w, dims, precision=precision)
