"""The offload store: prepared weights on disk, one contiguous aligned block per layer.

Streaming a layer must be one sequential read into a reusable buffer, with no conversion on the
way (a transpose or an int8 quantization on the reader thread would compete with compute for
the same cores). So the weights are prepared once (fitted to the params, run through the
module's ``@prepare``: int8 quantization, packing; cast to the declared dtypes) and written
here: a JSON header (``store.json``) and one data file (``weights.bin``) holding the global
(not per-layer) weights first and then layer 0..N-1, each layer block ``stride`` bytes apart,
every tensor at a 64-byte aligned offset within its block and every block 4096-byte aligned
(the page size: the buffers the blocks are read into are page-aligned too).

A store is keyed by the weights it was written from (``key``); a reader given another key
refuses it, so a changed layout or weight format never runs with stale bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from ir.errors import WeightsError

STORE_VERSION = 2  # 2: projection weights stored [out, in] (perms in the header)
TENSOR_ALIGN = 64
BLOCK_ALIGN = 4096
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
           "int8": np.dtype(np.int8), "int32": np.dtype(np.int32), "float64": np.dtype(np.float64)}


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor sits inside its block (global block, or any layer's block)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize

    def view(self, block: memoryview | np.ndarray) -> np.ndarray:
        """The tensor as an array over ``block``'s bytes (no copy)."""
        buf = np.frombuffer(block, dtype=np.uint8, count=self.nbytes, offset=self.offset)
        return buf.view(_DTYPES[self.dtype]).reshape(self.shape)


def _layout(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[tuple[TensorSlot, ...], int]:
    slots, off = [], 0
    for name, (dtype, shape) in tensors.items():
        s = TensorSlot(name, dtype, tuple(int(n) for n in shape), off)
        slots.append(s)
        off = _round_up(off + s.nbytes, TENSOR_ALIGN)
    return tuple(slots), _round_up(max(off, 1), BLOCK_ALIGN)


@dataclass(frozen=True)
class StoreLayout:
    """The header: the global tensors, the per-layer tensors, the layer count and stride."""

    key: str
    layers: int
    globals_: tuple[TensorSlot, ...]
    globals_bytes: int
    layer: tuple[TensorSlot, ...]
    stride: int
    #: (name, perm): tensors held as ``logical.transpose(perm)`` (of one layer for per-layer
    #: tensors): projection weights [out, in], as the resident runner keeps them
    perms: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def perm(self, name: str) -> tuple[int, ...] | None:
        return dict(self.perms).get(name)

    @property
    def layer_bytes(self) -> int:
        """Bytes one layer's buffer holds (its block, page-rounded)."""
        return self.stride

    def layer_offset(self, i: int) -> int:
        return self.globals_bytes + i * self.stride

    @property
    def file_bytes(self) -> int:
        return self.globals_bytes + self.layers * self.stride


def _slots_json(slots: tuple[TensorSlot, ...]) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": s.offset} for s in slots]


def _slots_of(rows: list[dict]) -> tuple[TensorSlot, ...]:
    return tuple(TensorSlot(r["name"], r["dtype"], tuple(r["shape"]), int(r["offset"])) for r in rows)


def plan_store(key: str, layers: int, global_types: Mapping[str, tuple[str, tuple[int, ...]]],
               layer_types: Mapping[str, tuple[str, tuple[int, ...]]],
               perms: Mapping[str, tuple[int, ...]] | None = None) -> StoreLayout:
    """The layout of a store from (dtype name, stored shape) per tensor (per-layer shapes
    without N): known before any weight is read, so the budget is checked before converting."""
    g_slots, g_bytes = _layout(global_types)
    l_slots, stride = _layout(layer_types)
    return StoreLayout(key, layers, g_slots, g_bytes, l_slots, stride,
                       tuple((k, tuple(int(i) for i in v)) for k, v in sorted((perms or {}).items())))


class StoreWriter:
    """Writes a planned store one tensor at a time (``pwrite`` at its offset), so converting a
    checkpoint holds one tensor, not the model; ``finish`` publishes it (header last)."""

    def __init__(self, directory: str | Path, layout: StoreLayout):
        self.dir, self.layout = Path(directory), layout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dir / "weights.bin.tmp"
        self.fd = os.open(str(self.tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, layout.file_bytes)  # unwritten padding reads as zeros
        self._globals = {s.name: s for s in layout.globals_}
        self._layer = {s.name: s for s in layout.layer}
        self.written: set[tuple[str, int | None]] = set()

    def _put(self, s: TensorSlot, base: int, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=_DTYPES[s.dtype])
        if a.shape != s.shape:
            raise WeightsError(f"offload store: '{s.name}' has shape {a.shape}, the layout says {s.shape}")
        mv = a.reshape(-1).view(np.uint8).data
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], base + s.offset + done)

    def put_global(self, name: str, a: np.ndarray) -> None:
        self._put(self._globals[name], 0, a)
        self.written.add((name, None))

    def put_layer(self, i: int, name: str, a: np.ndarray) -> None:
        self._put(self._layer[name], self.layout.layer_offset(i), a)
        self.written.add((name, i))

    def finish(self) -> StoreLayout:
        """Checks every tensor was written, syncs, and only then renames the data file and writes
        the header: a store that is there is whole (an interrupted write leaves none)."""
        want: set[tuple[str, int | None]] = {(s.name, None) for s in self.layout.globals_}
        want |= {(s.name, i) for s in self.layout.layer for i in range(self.layout.layers)}
        if want - self.written:
            os.close(self.fd)
            raise WeightsError(f"offload store: {len(want - self.written)} tensors were not written "
                               f"(first: {sorted(want - self.written, key=str)[0]})")
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.dir / "weights.bin")
        L = self.layout
        header = {"version": STORE_VERSION, "key": L.key, "layers": L.layers, "globals_bytes": L.globals_bytes,
                  "stride": L.stride, "globals": _slots_json(L.globals_), "layer": _slots_json(L.layer),
                  "perms": {k: list(v) for k, v in L.perms}}
        (self.dir / "store.json").write_text(json.dumps(header, indent=1))
        return L

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def write_store(directory: str | Path, key: str, global_weights: Mapping[str, np.ndarray],
                layer_weights: Mapping[str, np.ndarray]) -> StoreLayout:
    """Writes the store: ``layer_weights`` are stacked [N, ...] arrays (each layer's slice goes to
    its block), ``global_weights`` are written once. Arrays must already have their served dtypes."""
    stacked = {k: np.asarray(v) for k, v in layer_weights.items()}
    ns = {a.shape[0] for a in stacked.values()}
    if len(ns) != 1:
        raise WeightsError(f"offload store: per-layer weights disagree on the layer count: {sorted(ns)}")
    n = ns.pop()
    glob = {k: np.asarray(v) for k, v in global_weights.items()}
    layout = plan_store(key, n, {k: (v.dtype.name, v.shape) for k, v in glob.items()},
                        {k: (a.dtype.name, a.shape[1:]) for k, a in stacked.items()})
    w = StoreWriter(directory, layout)
    for k, v in glob.items():
        w.put_global(k, v)
    for i in range(n):
        for k, a in stacked.items():
            w.put_layer(i, k, a[i])
    return w.finish()


def read_layout(directory: str | Path, key: str | None = None) -> StoreLayout:
    """The header of the store in ``directory``; WeightsError when absent, stale or of another key."""
    d = Path(directory)
    try:
        h = json.loads((d / "store.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"no offload store in '{d}': {e}") from None
    if h.get("version") != STORE_VERSION:
        raise WeightsError(f"offload store '{d}' has version {h.get('version')}, this einshard reads {STORE_VERSION}",
                           hint="delete it; it is rebuilt from the checkpoint")
    if key is not None and h.get("key") != key:
        raise WeightsError(f"offload store '{d}' holds other weights (key {h.get('key')}, wanted {key})")
    layout = StoreLayout(h["key"], int(h["layers"]), _slots_of(h["globals"]), int(h["globals_bytes"]),
                         _slots_of(h["layer"]), int(h["stride"]),
                         tuple((k, tuple(v)) for k, v in sorted(h.get("perms", {}).items())))
    size = (d / "weights.bin").stat().st_size if (d / "weights.bin").exists() else -1
    if size != layout.file_bytes:
        raise WeightsError(f"offload store '{d}': weights.bin has {size} bytes, the header says {layout.file_bytes}",
                           hint="delete the folder; it is rebuilt from the checkpoint")
    return layout


def data_path(directory: str | Path) -> Path:
    return Path(directory) / "weights.bin"


def read_globals(directory: str | Path, layout: StoreLayout) -> dict[str, np.ndarray]:
    """The global weights, read once into their own (resident) arrays."""
    block = aligned_buffer(layout.globals_bytes)
    with open(data_path(directory), "rb", buffering=0) as f:
        read_into(f.fileno(), block, 0)
    return {s.name: s.view(block) for s in layout.globals_}


def aligned_buffer(nbytes: int, align: int = BLOCK_ALIGN) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose data starts at an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes]


def read_into(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fills ``buf`` from ``fd`` at ``offset`` (pread loop; releases the GIL while reading)."""
    mv = buf.data.cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise WeightsError(f"offload store: short read at byte {offset + done}")
        done += n


def evict(path: str | Path) -> None:
    """Drops the file's pages from the page cache (a cold read next time)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
