"""Measures the host CPU for the cost model's ``cpu`` chip: matmul FLOP/s, memory bandwidth,
per-op launch overhead. Cached as JSON so that later compiles do not measure again.

The cache lives at ``$XDG_CACHE_HOME/einshard/cpu-probe.json`` (``~/.cache`` when unset, the
platform convention) unless a directory is given. Measurements use JAX on one CPU device, the
same backend ``einshard run`` uses: an f32 matmul of 1024^3 (median of several runs), a copy of
a 64 MiB array (bytes read + written per second) and a sum over it (bytes read per second: a
decode step streams its weights read-only, and on this machine reading runs faster than
copying; the memory bandwidth is the larger of the two, so the roofline stays a bound), and the
time of a jitted chain of 64 tiny matmuls divided by 64 (XLA's per-kernel overhead). The
simulated devices of a CPU mesh share this memory, so the interconnect bandwidth is the copy
bandwidth. Offloading's memcpy and disk read rates are a second probe (:func:`io_probe`), cached
and keyed on its own so that neither re-runs the other.

A cache is only as good as the machine it was measured on, so each one records its key (CPU
model, cores this process may use, machine, jax and jaxlib versions, the probe's version) and
how it was measured (UTC time, the 1-minute load average before and after, the duration). It
is measured again when absent, unreadable, of another key, older than ``max_age_s`` (default 7
days, ``EINSHARD_PROBE_MAX_AGE_DAYS``), or when asked (``refresh=True``: ``explain --reprobe``).
Figures taken on a loaded machine are low; the load is recorded so that ``explain`` can say so.
Measure by hand on a quiet machine (``flock -x /tmp/einshard.cpu einshard explain ... --hardware
cpu --reprobe`` here).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ir.errors import CostError

PROBE_VERSION = 4
#: Caches older than this are measured again (seconds); ``EINSHARD_PROBE_MAX_AGE_DAYS`` overrides.
DEFAULT_MAX_AGE_S = 7 * 86400.0


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


#: the largest array :func:`read_bandwidth` reads: a few times this machine's 300 MiB L3, so a
#: larger step reads from DRAM at the same rate (and the probe never holds a model's size twice)
READ_CAP_BYTES = 1 << 30


def read_buffer_bytes(nbytes: int) -> int:
    """The bytes :func:`read_bandwidth` reads for a step that reads ``nbytes``: as many, at
    least 1 MiB and at most :data:`READ_CAP_BYTES`, a whole number of f32 elements."""
    return max(1 << 20, min(int(nbytes), READ_CAP_BYTES)) // 4 * 4


def read_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes/s of reading an f32 array as large as a step reads (``read_buffer_bytes``), the
    median of ``repeats`` warm sums. The roofline of a decode step that reads ``nbytes`` once:
    the probe's 64 MiB array fits the L3 of the machine this was written on (300 MiB), where it
    read at 29-44 GB/s and 538 MiB (SmolLM2's f32 weights) at 22-24 GB/s (2026-12-01), so a
    roofline from the cached probe swung between 36% and 125% on the same step. Measured
    now, not cached: the rate moves with the machine's load like the step it bounds."""
    import jax
    import jax.numpy as jnp

    with jax.default_device(jax.devices("cpu")[0]):
        buf = jnp.ones((read_buffer_bytes(nbytes) // 4,), jnp.float32)
    rate = buf.nbytes / _median_time(jax.jit(jnp.sum), buf, repeats=repeats)
    del buf
    return rate


def chip_fields(figures: dict) -> dict:
    """The cpu chip's fields (see compiler/cost/hardware.py) from a probe's figures."""
    import jax

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 << 30
    return {"name": "cpu", **figures, "hbm_bytes": int(total), "hop_latency_s": 0.0, "topology": "shared-memory",
            "source": f"measured on {platform.machine()} ({os.cpu_count()} cores) by runtime/probe.py, "
                      f"jax {jax.__version__}"}


def _measure() -> dict:
    return chip_fields(CpuProbe().sample())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("model name", "Processor", "cpu model"):
                return v.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int | None:
    """The cores this process may run on (its affinity mask; the machine's count elsewhere)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_key(probe_version: int = PROBE_VERSION) -> dict:
    """What the probe's figures depend on: a cache measured under another key is not reused."""
    import jax
    import jaxlib

    cores = _usable_cores()
    return {"cpu": cpu_model(), "machine": platform.machine(), "cores": cores, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "probe": probe_version}


def max_age_s() -> float:
    """The age past which a cache is measured again (``EINSHARD_PROBE_MAX_AGE_DAYS``, else 7 days)."""
    days = os.environ.get("EINSHARD_PROBE_MAX_AGE_DAYS")
    if not days:
        return DEFAULT_MAX_AGE_S
    try:
        value = float(days)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):  # a typo must not silently keep (or drop) every cache
        raise CostError(f"EINSHARD_PROBE_MAX_AGE_DAYS={days!r} is not a number of days",
                        hint="set it to a number >= 0 (e.g. 7), or unset it for the default of 7 days")
    return value * 86400.0


@dataclass(frozen=True)
class ProbeRecord:
    """A probe's figures with where they came from: the key they were measured under, when
    (unix seconds), the 1-minute load average before and after, and why they were (re)measured
    in this process (``reason``; "cached" when read from ``path``)."""

    figures: Mapping[str, Any]
    key: Mapping[str, Any]
    measured_at: float
    load_before: float
    load_after: float
    duration_s: float
    path: Path
    reason: str = "cached"
    method: str = ""
    running_before: int = 0  # processes running when it started (/proc/loadavg; itself included), 0: unknown

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.measured_at)

    def describe(self, now: float | None = None) -> str:
        """One line: when, at what load, under which key, and whether measured now or cached."""
        k = self.key
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at))
        # the 1-minute average lags: a machine that just went quiet still shows its last minute,
        # so the processes running at the start decide when they were recorded
        cores = float(k.get("cores") or os.cpu_count() or 1)
        loaded = self.load_before > cores and (self.running_before == 0 or self.running_before - 1 >= cores)
        return (f"measured {when} ({_age(self.age_s(now))} ago) at load {self.load_before:.1f} -> "
                f"{self.load_after:.1f} on {k.get('cores')} cores"
                + (f", {self.running_before - 1} other processes running" if self.running_before else "")
                + (" (a loaded machine: figures low; measure again when quiet)" if loaded else "")
                + f"; {k.get('cpu')}" + (f", jax {k['jax']}, jaxlib {k.get('jaxlib')}" if "jax" in k else "") + "; "
                + ("cached in " + str(self.path) if self.reason == "cached" else f"measured now ({self.reason})"))

    def to_json(self, now: float | None = None) -> dict:
        return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at)),
                "age_s": self.age_s(now), "load_before": self.load_before, "load_after": self.load_after,
                "duration_s": self.duration_s, "key": dict(self.key), "reason": self.reason, "path": str(self.path),
                "method": self.method}


def _age(s: float) -> str:
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def stale_reason(cached: Mapping, key: Mapping, now: float, max_age: float) -> str | None:
    """Why a cache entry (the JSON object stored by ``_probe_cached``) cannot be reused, or None."""
    if not isinstance(cached.get("key"), dict) or not isinstance(cached.get("measured"), dict) \
            or not isinstance(cached.get("figures"), dict):
        return "the cache predates keyed probes"
    diff = [f"{k} {cached['key'].get(k)!r} -> {v!r}" for k, v in key.items() if cached["key"].get(k) != v]
    if diff:
        return "key changed: " + ", ".join(diff)
    age = now - float(cached["measured"].get("unix", 0.0))
    if age > max_age:
        return f"older than {_age(max_age)} ({_age(age)})"
    if age < -60:
        return "measured in the future (clock changed)"
    return None


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _running() -> int:
    """Processes running now (/proc/loadavg's 4th field; this one included), 0 where unknown."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0


def _probe_cached(path: Path, key: dict, measure: Callable[[], dict], method: str, refresh: bool,
                  max_age: float | None) -> ProbeRecord:
    """The figures cached at ``path`` if still valid for ``key``, else measured now and stored."""
    now = time.time()
    reason = "asked (--reprobe)" if refresh else "no cache"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            why = stale_reason(data, key, now, max_age_s() if max_age is None else max_age)
            if why is None:
                m = data["measured"]
                return ProbeRecord(data["figures"], data["key"], float(m["unix"]), float(m["load_before"]),
                                   float(m["load_after"]), float(m["duration_s"]), path, "cached", m.get("method", ""),
                                   int(m.get("running_before", 0)))
            reason = why
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            reason = "the cache is unreadable"
    before, running, t0 = _load1(), _running(), time.perf_counter()
    figures = measure()
    rec = ProbeRecord(figures, key, now, before, _load1(), time.perf_counter() - t0, path, reason, method, running)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": key.get("probe"), "key": key, "figures": figures,
                                   "measured": {"unix": rec.measured_at, "utc": rec.to_json()["measured_at"],
                                                "load_before": before, "load_after": rec.load_after,
                                                "duration_s": rec.duration_s, "method": method,
                                                "running_before": running}}, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new cache, never half
    except OSError:
        pass  # an unwritable cache only costs a re-measurement
    return rec


CPU_METHOD = ("runtime/probe.py CpuProbe: median of 7 warm runs each of an f32 and a bf16 1024^3 matmul, "
              "a 64 MiB copy and sum, 21 of a 64-matmul chain on one JAX CPU device")


def cpu_probe(cache_dir: Path | None = None, refresh: bool = False, max_age: float | None = None) -> ProbeRecord:
    """The cpu chip's fields (see compiler/cost/hardware.py) with their provenance, from the
    cache at ``cache_dir/cpu-probe.json`` while it is valid (see the module docstring), else
    measured now."""
    d = cache_dir or default_cache_dir()
    return _probe_cached(d / "cpu-probe.json", machine_key(), _measure, CPU_METHOD, refresh, max_age)


def measure_cpu(cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """The cpu chip's fields (see compiler/cost/hardware.py), from the cache or measured now."""
    return dict(cpu_probe(cache_dir, refresh).figures)


# ---- host memory copy and disk read rates (for offloading; a separate, separately versioned cache)
IO_PROBE_VERSION = 2


def _read_direct(path: Path, nbytes: int, block: int, parts: int, start: int = 0) -> float | None:
    """Bytes/s of reading ``path`` with ``O_DIRECT`` as runtime/offload_pool.py's LayerPool
    reads a layer: ``block``-byte pieces, each as ``parts`` page-aligned parts in flight at once
    (the first on this thread), into an aligned buffer; None where the file system refuses it."""
    import errno
    from concurrent.futures import ThreadPoolExecutor

    from runtime.offload_store import BLOCK_ALIGN, aligned_buffer, read_into

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(str(path), os.O_RDONLY | flag)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None
    buf = aligned_buffer(block)
    buf.fill(0)
    size = -(-block // parts // BLOCK_ALIGN) * BLOCK_ALIGN
    pieces = [(s, min(s + size, block)) for s in range(0, block, size)]
    try:
        with ThreadPoolExecutor(max(1, len(pieces) - 1)) as io:
            t0 = time.perf_counter()
            for off in range(start, start + nbytes, block):
                futs = [io.submit(read_into, fd, buf[a:b], off + a) for a, b in pieces[1:]]
                read_into(fd, buf[pieces[0][0]:pieces[0][1]], off)
                for f in futs:
                    f.result()
            return nbytes / (time.perf_counter() - t0)
    except OSError as e:  # opened O_DIRECT but refuses its reads
        if e.errno != errno.EINVAL:
            raise
        return None
    finally:
        os.close(fd)


def _measure_io(scratch: Path) -> dict:
    """memcpy bytes/s (numpy copy of 64 MiB, median) and the read rates of a 256 MiB file in
    16 MiB blocks (about one SmolLM2 f32 layer): buffered from the disk (its pages dropped first:
    cold), buffered from the page cache (warm), and ``O_DIRECT`` in two parts in flight, the way
    the offload pool reads (``direct_bw``: the median of 5 passes, which move 1.2-2.1 GB/s here;
    the page cache plays no part, so there is no warm rate; the buffered cold rate where the file
    system refuses O_DIRECT)."""
    import numpy as np

    src = np.ones(16 << 20, np.float32)
    dst = np.empty_like(src)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    memcpy = src.nbytes / statistics.median(ts)
    path = scratch / f"io-probe.{os.getpid()}.bin"
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
        direct = [_read_direct(path, n_blocks * block.nbytes, block.nbytes, 2) for _ in range(5)]
    finally:
        path.unlink(missing_ok=True)
    ok = [r for r in direct if r is not None]
    return {"memcpy_bw": memcpy, "disk_bw": rates["cold"], "page_cache_bw": rates["warm"],
            "direct_bw": statistics.median(ok) if ok else rates["cold"], "direct": bool(ok),
            "source": f"measured on {platform.machine()} by runtime/probe.py (memcpy of 64 MiB; a 256 MiB file "
                      f"read in 16 MiB blocks: buffered cold after posix_fadvise DONTNEED, then warm, then "
                      + ("O_DIRECT in 2 parts in flight, median of 5 passes)" if ok
                         else "O_DIRECT refused by the file system: the buffered cold rate stands for it)")}


IO_METHOD = "runtime/probe.py _measure_io (see its docstring)"


def io_key(scratch: Path) -> dict:
    """What the I/O figures depend on: the CPU (memcpy), the file system's device, the probe."""
    try:
        dev = os.stat(scratch).st_dev
    except OSError:
        dev = -1
    cores = _usable_cores()
    return {"cpu": cpu_model(), "machine": platform.machine(), "cores": cores, "device": dev,
            "probe": IO_PROBE_VERSION}


def io_probe(cache_dir: Path | None = None, refresh: bool = False, max_age: float | None = None) -> ProbeRecord:
    """This machine's memcpy, disk, page-cache and O_DIRECT read rates (bytes/s) with their
    provenance, cached in ``io-probe.json`` beside the CPU probe (its own key and version: the
    CPU probe is not re-run). The scratch file is written in ``cache_dir``, so the rates are of
    the disk that directory is on."""
    d = cache_dir or default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return _probe_cached(d / "io-probe.json", io_key(d), lambda: _measure_io(d), IO_METHOD, refresh, max_age)


def measure_io(cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """``io_probe``'s figures alone."""
    return dict(io_probe(cache_dir, refresh).figures)
