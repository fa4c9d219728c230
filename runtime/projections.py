"""Projection weights stored ``[out, in]`` on device, and the matmul that reads them there.

XLA's CPU backend fuses an int8 (or bf16) -> f32 convert into a matrix-vector product only
when the weight's contracted dim is contiguous and the dot contracts the last dim of both
operands (``x[P, C] @ w[Q, C].T``): 60 layers of a 576 x 1536 int8 weight then run at the
memory bandwidth of the int8 bytes, while the IR's ``[in, out]`` layout (``C`` leading) makes
XLA convert the whole weight to f32 in memory first, 5-20x slower. So the runtime keeps every
projection weight physically with its output dims first, as checkpoints store it: the IR's
logical dims are unchanged (an entry transposes the stored array back, a view that XLA drops
when the only readers are projections), and :class:`Sources` remembers, while a program is
traced, which logical value is a stored weight or a dequantized int8 weight, so that the
backend's einsum reads the stored int8 bytes directly and applies the per-output-channel scale
to the product's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ir.module import Function, Module
from ir.ops import Einsum, Scan

#: Per param: the permutation ``perm`` with ``stored = logical.transpose(perm)`` (over the dims
#: of one layer for params passed as per-layer lists, else over all dims).
Layouts = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Projection:
    """An einsum ``PC,CQ->PQ`` (``out_in`` False) or ``PC,QC->PQ`` (True): ``p``/``q`` the
    flat sizes and dims of P and Q, ``c`` the contracted size, ``n`` the number of C letters."""

    p: tuple[int, tuple[int, ...]]
    c: int
    q: tuple[int, tuple[int, ...]]
    n: int
    out_in: bool


def projection_letters(spec: str) -> tuple[int, bool] | None:
    """(number of contracted letters, whether the weight is ``QC``) when ``spec`` is a
    two-operand projection ``PC,CQ->PQ`` or ``PC,QC->PQ`` (letters in that order, no batch or
    summed-away letters), else None."""
    ins, out = spec.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(set(a + b)) == len(a + b):
        return None
    for n in range(min(len(a), len(b)), 0, -1):
        c = a[len(a) - n:]
        if b.startswith(c) and out == a[: len(a) - n] + b[n:] and len(set(a + b)) == len(a) + len(b) - n:
            return n, False
        if n < len(b) and b.endswith(c) and out == a[: len(a) - n] + b[: len(b) - n] \
                and len(set(a + b)) == len(a) + len(b) - n:
            return n, True
    return None


def projection(spec: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> Projection | None:
    """The :class:`Projection` of ``spec`` over operands of these shapes (None: not one)."""
    pl = projection_letters(spec)
    if pl is None:
        return None
    n, out_in = pl
    pd = tuple(x_shape[: len(x_shape) - n])
    qd = tuple(w_shape[: len(w_shape) - n]) if out_in else tuple(w_shape[n:])
    c = int(np.prod(x_shape[len(x_shape) - n:], dtype=np.int64))
    return Projection((int(np.prod(pd, dtype=np.int64)), pd), c, (int(np.prod(qd, dtype=np.int64)), qd), n, out_in)


class Sources:
    """What a traced value is, for the einsum that reads it: a weight kept ``[out, in]`` (the
    stored array) or a dequantized int8 weight (its int8 array and scales). Keyed by the
    identity of the traced value; the value itself is kept so that the key stays unique."""

    def __init__(self) -> None:
        self._stored: dict[int, tuple[Any, Any, int, int]] = {}
        self._deq: dict[int, tuple[Any, Any, Any]] = {}
        self._rows: dict[int, tuple[Any, Any, Any]] = {}

    def restore(self, stored: Any, perm: tuple[int, ...], xp: Any, shape: tuple[int, ...] | None = None) -> Any:
        """The logical value (of shape ``shape``) of a stored weight (a transpose, after a
        reshape when it is stored flat: :func:`flat_stored`), remembered as coming from it."""
        inv = tuple(int(i) for i in np.argsort(perm))
        full = stored if stored.ndim == len(perm) else xp.reshape(stored, tuple(shape[i] for i in perm))  # type: ignore[index]
        logical = xp.transpose(full, inv)
        n_out = _leading_out(perm)
        if n_out is not None:
            self._stored[id(logical)] = (logical, stored, n_out, len(perm) - n_out)
        return logical

    def dequantized(self, w: Any, q: Any, scale: Any, reduce: str, names: str) -> None:
        """``w`` is ``q * scale`` (q's dims ``names``) with ``scale`` over every dim but
        ``reduce``; remembered when the reduced dims lead (the contracted dims of a ``CQ``
        weight), so the scale is over the output dims in order."""
        if set(names[: len(reduce)]) == set(reduce):
            self._deq[id(w)] = (w, q, scale)
        if set(names[len(names) - len(reduce):]) == set(reduce) and getattr(q, "ndim", 0) == len(names):
            self._rows[id(w)] = (w, q, scale)

    def row_scaled(self, w: Any, n: int) -> tuple[Any, Any] | None:
        """(the int8 array, the scales over its leading dims) when ``w`` is a dequantized int8
        weight ``[Q..., C...]`` scaled over all but its ``n`` trailing (reduced) dims: a tied
        embedding read as the output head (``PC,QC->PQ``) or gathered by rows."""
        d = self._rows.get(id(w))
        if d is None or d[0] is not w or d[2].ndim != d[1].ndim - n:
            return None
        return d[1], d[2]

    def out_in(self, w: Any, n: int) -> tuple[Any, Any] | None:
        """(the weight as ``[Q..., C...]`` stored, the scales over Q or None) when ``w`` (a
        ``C..., Q...`` logical weight with ``n`` C dims) is a stored or dequantized stored
        weight."""
        scale = None
        d = self._deq.get(id(w))
        if d is not None and d[0] is w:
            w, scale = d[1], d[2]
        s = self._stored.get(id(w))
        if s is None or s[0] is not w or s[3] != n:
            return None
        if scale is not None and scale.ndim != s[2]:
            return None
        return s[1], scale


def _leading_out(perm: tuple[int, ...]) -> int | None:
    """The number of output dims when ``perm`` moves the trailing (output) dims of a
    ``C..., Q...`` value in front, keeping each group in order; None for another permutation."""
    k = len(perm)
    for n_out in range(1, k):
        if tuple(perm) == tuple(range(k - n_out, k)) + tuple(range(k - n_out)):
            return n_out
    return None


def out_in_layouts(module: Module, entry: str, split_layers: bool) -> Layouts:
    """The weights of ``entry`` worth storing ``[out, in]``: those read only by projections
    ``PC,CQ->PQ`` as the weight ``CQ`` (directly, through a dequantize, or inside the layer
    loop), with the same C. Weights already ``QC`` (a tied embedding read as the output head)
    and weights with other readers stay as they are."""
    fn = module.function(entry)
    out: Layouts = {}
    for p in fn.params_with_role("weight"):
        n = _contracted(module, fn, p.name)
        if not n:
            continue
        k = len(p.type.dims)
        split = split_layers and k > 0 and p.type.dims[0].name == "N" and not p.type.dims[0].axes
        lead = 1 if p.type.dims and p.type.dims[0].name == "N" else 0  # a stacked layer dim stays first
        dims = k - lead
        if dims - n < 1:
            continue
        perm = tuple(range(n, dims)) + tuple(range(n))
        out[p.name] = perm if split else tuple(range(lead)) + tuple(i + lead for i in perm)
    return out


def _contracted(module: Module, fn: Function, name: str) -> int:
    """The number of contracted (leading) dims of weight ``name`` when every reader is a
    projection ``PC,CQ->PQ`` with it as ``CQ`` and the same C; 0 otherwise."""
    found: set[int] = set()
    ok = _collect(module, fn, name, found, in_layer=False)
    return found.pop() if ok and len(found) == 1 else 0


def _collect(module: Module, fn: Function, v: str, found: set[int], in_layer: bool) -> bool:
    readers = [op for op in fn.ops if v in op.operands]
    if not readers or v in fn.returns:
        return False
    for op in readers:
        if isinstance(op, Einsum):
            pl = projection_letters(op.spec)
            if pl is None or pl[1] or op.operands[1] != v or op.operands[0] == v:
                return False
            found.add(pl[0])
        elif op.kind == "dequantize" and op.operands[0] == v:
            if op.segments or not _collect(module, fn, op.results[0], found, in_layer):
                return False
        elif isinstance(op, Scan) and not in_layer:
            body = module.function(op.body.name)
            idx = [i for i, o in enumerate(op.operands) if o == v]
            if any(i < op.carry for i in idx):
                return False
            if not all(_collect(module, body, body.params[i].name, found, True) for i in idx):
                return False
        else:
            return False
    return True


def flat_stored(perm: tuple[int, ...] | None, dtype: Any) -> bool:
    """Whether a weight stored ``[out, in]`` by ``perm`` is kept as a 2-D ``[Q, C]`` array (one
    device only; a mesh keeps every dim, its specs being per dim): an int8 or bf16 weight whose
    contraction spans several dims (``wo``: ``KGD``). XLA's CPU backend fuses such a weight's
    convert into the matrix-vector dot, but its elemental loop then indexes the contracted
    dims of the 4-D parameter one by one and is no longer vectorised: SmolLM2's int8 ``wo``
    ([576, 3, 3, 64]) took 9x the time of ``wq`` (the same bytes, one contracted dim). The
    f32 library dot reads any shape as 2-D, so f32 weights keep their dims."""
    n_out = None if perm is None else _leading_out(perm)
    return n_out is not None and len(perm) - n_out > 1 and np.dtype(dtype) != np.float32  # type: ignore[arg-type]


def transpose_host(x: Any, perm: tuple[int, ...] | None, flat: bool = False) -> Any:
    """A host array in its stored layout (contiguous; ``flat``: as ``[Q, C]``)."""
    if perm is None:
        return x
    y = np.ascontiguousarray(np.transpose(np.asarray(x), perm))
    if flat:
        n_out = _leading_out(perm)
        y = y.reshape(int(np.prod(y.shape[:n_out])), -1)
    return y


def permute_spec(spec: Any, perm: tuple[int, ...] | None) -> Any:
    """A PartitionSpec over logical dims reordered as the stored array's dims."""
    if perm is None:
        return spec
    entries = tuple(spec) + (None,) * (len(perm) - len(tuple(spec)))
    return type(spec)(*[entries[i] for i in perm])
