"""A fixed pool of layer buffers filled from the offload store, in layer order, by a reader thread.

Every forward pass (prefill or decode) visits layers 0..N-1 in order, so the reader simply reads
the layers cyclically, one buffer per layer, as far ahead as free buffers allow: the pool size
is the prefetch depth, and the first layers of the next pass are read while the current pass
finishes (its last layers, the head, sampling). ``preadv`` releases the GIL, so the read runs
beside the compute.

A buffer goes back to the pool only when the caller releases it, and the caller releases it
only after the layer that reads it has finished (it blocks on the layer's outputs): on CPU a
JAX array made from a host buffer may alias it, so refilling it earlier would change weights
under a running computation. ``poison=True`` fills released buffers with 0xFF bytes (NaN in
every float format) so a test can show that nothing reads a buffer after its release.

Without prefetch (``prefetch=False``) the caller's thread reads each layer when it asks for it,
into a single buffer: the baseline the prefetching pool is measured against.

Reads bypass the page cache (``O_DIRECT``, ``direct=True``, the default) where the file system
allows it: the disk writes straight into the aligned buffer, where a buffered read costs a
kernel copy of every byte on one of the cores the compute runs on (3-6 ms of CPU per 14 MB layer
here, against 0.3 ms direct), and a store larger than the page cache, the case offloading is for,
gains nothing from caching. A layer is read as ``io_depth`` page-aligned parts in flight at
once (the disk is faster with more than one request queued).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ir.errors import WeightsError
from runtime.offload_store import BLOCK_ALIGN, StoreLayout, aligned_buffer, read_into


@dataclass
class StreamStats:
    """What streaming cost: bytes and seconds read, and the seconds the compute waited."""

    layers_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class LayerPool:
    path: Path
    layout: StoreLayout
    slots: int
    prefetch: bool = True
    evict_after_read: bool = False  # emulate a store larger than the page cache: every read is cold
    poison: bool = False
    direct: bool = True  # O_DIRECT where the file system takes it (falls back to buffered reads)
    io_depth: int = 2  # page-aligned parts of a layer read at once
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise WeightsError("the layer pool needs at least one buffer")
        if not self.prefetch:
            self.slots = 1
        self.buffers = [aligned_buffer(self.layout.layer_bytes) for _ in range(self.slots)]
        for b in self.buffers:
            b.fill(0)  # touch the pages now: the pool's memory is resident from the start
        self.fd = os.open(str(self.path), os.O_RDONLY)
        self._dfd = self._open_direct() if self.direct else None
        self.direct = self._dfd is not None
        parts = max(1, self.io_depth)
        size = -(-self.layout.stride // parts // BLOCK_ALIGN) * BLOCK_ALIGN
        self._parts = [(s, min(s + size, self.layout.stride)) for s in range(0, self.layout.stride, size)]
        self._io = ThreadPoolExecutor(len(self._parts) - 1, "einshard-layer-io") if len(self._parts) > 1 else None
        self._free: queue.Queue[int] = queue.Queue()
        self._filled: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
        self._next_sync = 0
        self._held: dict[int, int] = {}  # layer -> buffer, between acquire and release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for i in range(self.slots):
            self._free.put(i)
        if self.prefetch:
            self._thread = threading.Thread(target=self._reader, name="einshard-layer-reader", daemon=True)
            self._thread.start()

    # ---- reading -------------------------------------------------------------------------
    def _open_direct(self) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return os.open(str(self.path), os.O_RDONLY | flag)
        except OSError as e:  # tmpfs and some others refuse O_DIRECT
            if e.errno != errno.EINVAL:
                raise
            return None

    def _read_parts(self, buf: np.ndarray, off: int) -> None:
        """Reads the layer's parts, all but the first on the io threads, the first here."""
        fd = self._dfd if self._dfd is not None else self.fd
        futs = [self._io.submit(read_into, fd, buf[s:e], off + s) for s, e in self._parts[1:]] if self._io else []
        try:
            s, e = self._parts[0]
            read_into(fd, buf[s:e], off + s)
        finally:
            errors = [f.exception() for f in futs]
        for err in errors:
            if err is not None:
                raise err

    def _read(self, layer: int, buf: int) -> None:
        off = self.layout.layer_offset(layer)
        t0 = time.perf_counter()
        try:
            self._read_parts(self.buffers[buf], off)
        except OSError as e:  # a file system that opened O_DIRECT but refuses its reads
            if self._dfd is None or e.errno != errno.EINVAL:
                raise
            os.close(self._dfd)
            self._dfd, self.direct = None, False
            self._read_parts(self.buffers[buf], off)
        if self.evict_after_read:
            os.posix_fadvise(self.fd, off, self.layout.stride, os.POSIX_FADV_DONTNEED)
        self.stats.read_s += time.perf_counter() - t0
        self.stats.layers_read += 1
        self.stats.bytes_read += self.layout.stride

    def _reader(self) -> None:
        layer = 0
        try:
            while True:
                b = self._free.get()
                if self._stop.is_set():
                    return
                self._read(layer, b)
                self._filled.put((layer, b))
                layer = (layer + 1) % self.layout.layers
        except BaseException as e:  # handed to the consumer, which raises it
            self._filled.put(e)

    # ---- the consumer's side -------------------------------------------------------------
    def acquire(self, layer: int) -> np.ndarray:
        """The buffer holding ``layer``'s block (waits for the reader); layers come in order."""
        t0 = time.perf_counter()
        if not self.prefetch:
            if layer != self._next_sync:
                raise WeightsError(f"layer pool: asked for layer {layer}, expected {self._next_sync}")
            b = self._free.get_nowait()
            self._read(layer, b)
            self._next_sync = (layer + 1) % self.layout.layers
        else:
            got = self._filled.get()
            if isinstance(got, BaseException):
                raise got
            got_layer, b = got
            if got_layer != layer:
                raise WeightsError(f"layer pool: asked for layer {layer}, the reader delivered {got_layer}")
        self.stats.wait_s += time.perf_counter() - t0
        self._held[layer] = b
        return self.buffers[b]

    def release(self, layer: int) -> None:
        """Hands ``layer``'s buffer back for refilling; call it only once the layer has finished."""
        b = self._held.pop(layer)
        if self.poison:
            self.buffers[b].fill(0xFF)
        self._free.put(b)

    @property
    def pool_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def close(self) -> None:
        """Stops the reader thread (woken through the free queue) and closes the files."""
        self._stop.set()
        for _ in range(self.slots):
            self._free.put(-1)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._io is not None:
            self._io.shutdown(wait=True)
        if self._dfd is not None:
            os.close(self._dfd)
        os.close(self.fd)
