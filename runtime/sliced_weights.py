"""Checkpoint weights read slice by slice: each process of a multi-process run reads only the
parts of the safetensors files (or the GGUF file) its devices hold.

``lazy_weights`` checks a Hugging Face checkpoint exactly as ``HFCheckpoint.load_weights`` does
(from the file headers) but reads nothing: every einshard weight is a :class:`LazyWeight` whose
``w[index]`` reads just that block. ``jax.make_array_from_callback`` asks for the blocks of this
process's devices (runtime/distributed.py), so a process reads about 1/N of a weight sharded N
ways. The einshard block maps back onto a box of the Hugging Face tensor, read with safetensors'
``get_slice``: a torch ``Linear`` weight (out, in) is transposed and its axes split into head
letters (runtime/recipes.py), so a range of the first letter on each side is a contiguous range
of rows and of columns; the rest of the block is cut in memory. Recipes that are not one plain
tensor (Falcon's fused qkv, zeros) read their layer whole and cut it.

A GGUF file is read the same way through ``GGUFCheckpoint.box_readers``: a box's rows, and of
each row the quantization blocks that cover its columns, dequantized (runtime/gguf.py).
:data:`STATS` counts the checkpoint bytes read (a process's share, for the measured figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Mapping

import numpy as np
from safetensors import safe_open

from ir.errors import SpecError, WeightsError
from ir.model import ModelSpec
from ir.types import TensorType
from runtime.checkpoint import FLOAT_DTYPES, Checkpoint, HFCheckpoint, check_same_model, read_safetensors_index
from runtime.hf_config import falcon_qkv_layout
from runtime.recipes import TensorInfo, _check_tensors, _expand, _linear, _out_dtype, _same, recipes_for

#: (layer or None, block index within the per-layer shape) -> the block, float32
ReadFn = Callable[[int | None, tuple[slice, ...]], np.ndarray]
#: (HF tensor name, box of it) -> the box, float32
GetFn = Callable[[str, tuple[slice, ...]], np.ndarray]
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class ReadStats:
    """Checkpoint bytes this process read through lazy weights (file bytes: quantized for GGUF)."""

    bytes: int = 0
    reads: int = 0

    def add(self, n: int) -> None:
        self.bytes += int(n)
        self.reads += 1


STATS = ReadStats()


@dataclass(frozen=True)
class LazyWeight:
    """An einshard weight not yet read: ``w[block]`` reads one block, ``w[i]`` (an int, layered
    weights) is layer i, still lazy, and ``np.asarray(w)`` reads it all."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: ReadFn
    layered: bool
    layer: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, (int, np.integer)) and self.layered and self.layer is None:
            return replace(self, shape=self.shape[1:], layer=int(idx), layered=False)
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = tuple(idx) + (slice(None),) * (self.ndim - len(idx))
        if any(not isinstance(s, slice) or s.step not in (None, 1) for s in idx):
            return np.asarray(self)[idx]
        if self.layered and self.layer is None:
            layers = range(*idx[0].indices(self.shape[0]))
            out = np.stack([self.read(i, idx[1:]) for i in layers]) if layers else \
                np.zeros((0,) + _block_shape(self.shape[1:], idx[1:]), np.float32)
        else:
            out = self.read(self.layer, idx)
        return out.astype(self.dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[(slice(None),) * self.ndim]
        return a if dtype is None else a.astype(dtype)


def _block_shape(shape: tuple[int, ...], idx: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))


def _get(info: TensorInfo, name: str, box: tuple[slice, ...]) -> np.ndarray:
    """A box of one safetensors tensor, float32."""
    try:
        with safe_open(str(info.file), framework="numpy") as f:
            return np.asarray(f.get_slice(name)[box], dtype=np.float32)
    except Exception as e:  # OSError, SafetensorError
        raise WeightsError(f"cannot read tensor '{name}' from '{info.file}': {e}") from None


def _split(shape: tuple[int, ...], size: int) -> int:
    """How many leading dims of ``shape`` multiply to ``size`` (the 'in' side of a Linear)."""
    p, n = 0, 1
    while p < len(shape) and n < size:
        n *= shape[p]
        p += 1
    if n != size:
        raise ValueError(f"no leading dims of {shape} multiply to {size}")
    return p


def _lead_range(dims: tuple[int, ...], idx: tuple[slice, ...]) -> tuple[slice, tuple[slice, ...]]:
    """The flat range covering ``idx``'s range of the first of ``dims`` and all of the others,
    and the index that cuts the block out of it."""
    if not dims:
        return slice(0, 1), ()
    a, b, _ = idx[0].indices(dims[0])
    inner = math.prod(dims[1:])
    return slice(a * inner, max(a, b) * inner), (slice(0, max(a, b) - a),) + tuple(idx[1:])


def _safetensors_get(index: Mapping[str, TensorInfo]) -> GetFn:
    def get(name: str, box: tuple[slice, ...]) -> np.ndarray:
        out = _get(index[name], name, box)
        STATS.add(out.size * _ITEMSIZE.get(index[name].dtype, 4))
        return out
    return get


def _gguf_get(readers: Mapping[str, Callable[[tuple[slice, ...]], tuple[np.ndarray, int]]]) -> GetFn:
    def get(name: str, box: tuple[slice, ...]) -> np.ndarray:
        out, n = readers[name](box)
        STATS.add(n)
        return out
    return get


def _reader(rc: Any, index: Mapping[str, TensorInfo], core: tuple[int, ...], get: GetFn) -> ReadFn:
    srcs = [s for s, _ in rc.sources]

    def hf(layer: int | None, k: int = 0) -> str:
        return srcs[k].format(i=layer) if rc.layered else srcs[k]

    if rc.convert is _linear and len(srcs) == 1:
        def read_linear(layer: int | None, idx: tuple[slice, ...]) -> np.ndarray:
            n = hf(layer)
            out_size, in_size = index[n].shape
            p = _split(core, in_size)
            cols, cut_in = _lead_range(core[:p], idx[:p])
            rows, cut_out = _lead_range(core[p:], idx[p:])
            box = get(n, (rows, cols))  # (out rows, in cols)
            n_in = (cut_in[0].stop,) + core[1:p] if p else ()
            n_out = (cut_out[0].stop,) + core[p + 1:] if p < len(core) else ()
            return box.T.reshape(n_in + n_out)[cut_in + cut_out]
        return read_linear
    if rc.convert is _same and len(srcs) == 1:
        def read_same(layer: int | None, idx: tuple[slice, ...]) -> np.ndarray:
            n = hf(layer)
            hs = index[n].shape
            if hs == core:
                return get(n, idx)
            if len(hs) == 1:
                flat, cut = _lead_range(core, idx)
                return get(n, (flat,)).reshape((cut[0].stop,) + core[1:])[cut]
            return get(n, tuple(slice(None) for _ in hs)).reshape(core)[idx]
        return read_same

    def read_whole(layer: int | None, idx: tuple[slice, ...]) -> np.ndarray:
        xs = [get(hf(layer, k), tuple(slice(None) for _ in index[hf(layer, k)].shape)) for k in range(len(srcs))]
        return np.asarray(rc.convert(xs, core), np.float32)[idx]
    return read_whole


def lazy_weights(ck: Checkpoint, model: ModelSpec, types: Mapping[str, TensorType]) -> dict[str, LazyWeight]:
    """``ck.load_weights(model, types)`` with nothing read yet: the same checks (from the headers),
    then one LazyWeight per einshard weight. ``ck``: a Hugging Face directory or a GGUF file."""
    from runtime.gguf import DEQUANTIZABLE, GGUFCheckpoint

    layout = ""
    get: GetFn
    accepted: Collection[str]
    if isinstance(ck, GGUFCheckpoint):
        family, where, accepted = "llama", "its GGUF metadata", DEQUANTIZABLE
        try:
            described = ck.model_spec()
        except SpecError as e:
            raise WeightsError(e.message, e.loc, e.hint) from None
        index = ck.tensor_index(model)
        get = _gguf_get(ck.box_readers(model))
    elif isinstance(ck, HFCheckpoint):
        cfg, family, described = ck.described()
        where, accepted = cfg.path.name, FLOAT_DTYPES
        layout = falcon_qkv_layout(cfg) if family == "falcon" else ""
        index = read_safetensors_index(ck.path)
        get = _safetensors_get(index)
    else:
        raise WeightsError(f"cannot read '{ck.path}' slice by slice (a {type(ck).__name__})")
    check_same_model(model, described, where, str(ck.path))
    recipes = recipes_for(family, model, layout)
    unknown = [n for n in types if n not in recipes]
    if unknown:
        raise WeightsError(f"a {family} checkpoint has no tensors for einshard weight(s) {', '.join(unknown)}")
    wanted = [src for n in types for src in _expand(recipes[n], model.layers)]
    _check_tensors(str(ck.path), model, family, wanted, index, accepted)
    out = {}
    for name, t in types.items():
        rc, shape = recipes[name], tuple(t.shape)
        core = shape[1:] if rc.layered else shape
        out[name] = LazyWeight(name, shape, _out_dtype(t), _reader(rc, index, core, get), rc.layered)
    return out
