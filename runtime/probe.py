"""Measures the host CPU for the cost model's ``cpu`` chip: matmul FLOP/s, memory bandwidth,
per-op launch overhead. Cached as JSON so that later compiles do not measure again.

The cache lives at ``$XDG_CACHE_HOME/einshard/cpu-probe.json`` (``~/.cache`` when unset, the
platform convention) unless a directory is given. Measurements use JAX on one CPU device, the
same backend ``einshard run`` uses: an f32 matmul of 1024^3 (median of several runs), a copy of
a 64 MiB array (bytes read + written per second) and a sum over it (bytes read per second: a
decode step streams its weights read-only, and on this machine reading runs faster than
copying; the memory bandwidth is the larger of the two, so the roofline stays a bound), and the time of a jitted chain of 64 tiny
matmuls divided by 64 (XLA's per-kernel overhead). The simulated devices of a CPU mesh share
this memory, so the interconnect bandwidth is the copy bandwidth.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

PROBE_VERSION = 3


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "einshard"


def _median_time(fn, *args, repeats: int = 7) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class CpuProbe:
    """The probe's kernels, compiled once, so that a benchmark can sample the machine between its
    own measurements (``sample``): on a shared machine the load then inflates the probe's figures
    and the benchmark's times alike, instead of the probe seeing a quieter (or busier) moment."""

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self._cpu = jax.devices("cpu")[0]
        n = self._n = 1024
        with jax.default_device(self._cpu):
            self._a = jnp.ones((n, n), jnp.float32)
            self._ab = self._a.astype(jnp.bfloat16)
            self._big = jnp.ones((16 << 20,), jnp.float32)  # 64 MiB
            self._small = jnp.ones((8, 8), jnp.float32)
        self._mm = jax.jit(lambda x, y: x @ y)
        self._copy = jax.jit(lambda x: x * 1.0001)
        self._sum = jax.jit(jnp.sum)

        def chain(x):
            for _ in range(64):
                x = jnp.tanh(x @ x)  # dots do not fuse with each other: 64 kernels
            return x

        self._chain = jax.jit(chain)
        self._empty = jax.jit(lambda x: x + 1.0)

    def sample(self, repeats: int = 7) -> dict:
        """One measurement of every figure (each the median of ``repeats`` warm runs)."""
        n, r = self._n, repeats
        flops_f32 = 2 * n**3 / _median_time(self._mm, self._a, self._a, repeats=r)
        flops_bf16 = 2 * n**3 / _median_time(self._mm, self._ab, self._ab, repeats=r)
        copy_bw = 2 * self._big.nbytes / _median_time(self._copy, self._big, repeats=r)
        read_bw = self._big.nbytes / _median_time(self._sum, self._big, repeats=r)
        overhead = max(0.0, _median_time(self._chain, self._small, repeats=3 * r)
                       - _median_time(self._empty, self._small, repeats=3 * r)) / 64
        return {"flops_f32": flops_f32, "flops_bf16": flops_bf16, "hbm_bw": max(copy_bw, read_bw),
                "ici_bw": copy_bw, "op_overhead_s": overhead}


def chip_fields(figures: dict) -> dict:
    """The cpu chip's fields (see compiler/cost/hardware.py) from a probe's figures."""
    import jax

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 << 30
    return {"name": "cpu", **figures, "hbm_bytes": int(total), "hop_latency_s": 0.0, "topology": "shared-memory",
            "source": f"measured on {platform.machine()} ({os.cpu_count()} cores) by runtime/probe.py, "
                      f"jax {jax.__version__}"}


def _measure() -> dict:
    return chip_fields(CpuProbe().sample())


def measure_cpu(cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """The cpu chip's fields (see compiler/cost/hardware.py), from the cache or measured now."""
    d = cache_dir or default_cache_dir()
    path = d / "cpu-probe.json"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.pop("version", None) == PROBE_VERSION:
                return data
        except (OSError, ValueError):
            pass
    data = _measure()
    try:
        d.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**data, "version": PROBE_VERSION}, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-measurement
    return data


# ---- host memory copy and disk read rates (for offloading; a separate, separately versioned cache)
IO_PROBE_VERSION = 1


def _measure_io(scratch: Path) -> dict:
    """memcpy bytes/s (numpy copy of 64 MiB, median) and the read rate of a 256 MiB file from
    the disk (its pages dropped first: cold) and from the page cache (warm), read in 16 MiB
    blocks as the offload reader does."""
    import numpy as np

    src = np.ones(16 << 20, np.float32)
    dst = np.empty_like(src)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    memcpy = src.nbytes / statistics.median(ts)
    path = scratch / "io-probe.bin"
    block = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
    n_blocks = 16
    with open(path, "wb") as f:
        for _ in range(n_blocks):
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())
    rates = {}
    try:
        for kind in ("cold", "warm"):
            fd = os.open(str(path), os.O_RDONLY)
            try:
                if kind == "cold":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                mv = dst.data.cast("B")[: block.nbytes]
                t0 = time.perf_counter()
                for i in range(n_blocks):
                    done = 0
                    while done < len(mv):
                        got = os.preadv(fd, [mv[done:]], i * len(mv) + done)
                        if got <= 0:
                            raise OSError(f"short read from {path}")
                        done += got
                rates[kind] = n_blocks * len(mv) / (time.perf_counter() - t0)
            finally:
                os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return {"memcpy_bw": memcpy, "disk_bw": rates["cold"], "page_cache_bw": rates["warm"],
            "source": f"measured on {platform.machine()} by runtime/probe.py (memcpy of 64 MiB; a 256 MiB file "
                      f"read cold after posix_fadvise DONTNEED, then warm)"}


def measure_io(cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """This machine's memcpy, disk and page-cache read rates (bytes/s), cached in
    ``io-probe.json`` beside the CPU probe (its own version: the CPU probe is not re-run)."""
    d = cache_dir or default_cache_dir()
    path = d / "io-probe.json"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.pop("version", None) == IO_PROBE_VERSION:
                return data
        except (OSError, ValueError):
            pass
    d.mkdir(parents=True, exist_ok=True)
    data = _measure_io(d)
    try:
        path.write_text(json.dumps({**data, "version": IO_PROBE_VERSION}, indent=1))
    except OSError:
        pass
    return data
