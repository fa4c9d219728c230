"""``einshard explain --offload host|disk``: what streaming the layers' weights costs per step.

ZeRO-Inference's arithmetic: with the weights off the device, every decode step moves every
layer's weights over the host link (``--offload host``: PCIe from pinned host memory) or from
the disk (``--offload disk``: NVMe, or this machine's measured disk), once per step whatever
the batch. The step's compute grows with the batch, the transfer does not, so a large enough
batch hides the transfer behind the compute. Per step, with N layers, per-layer compute c (the
resident step's layer, from the cost model), per-layer transfer t = layer bytes / link bandwidth
and o for what runs outside the layers (embedding, head):

* with prefetch (layer i+1 fetched while layer i computes):  t + (N-1) max(c, t) + c + o
  (the first layer's transfer is exposed; then the slower of the two sets the pace; on the
  ``cpu`` chip each layer also pays ``CPU_EXPOSED`` x min(c, t): the overlap on two shared
  cores is partial, as measured);
* without prefetch: N (c + t) + o.

The resident step is N c + o; the fraction of resident throughput is their ratio, and the batch
at which it reaches a target (default 90%) is found by sweeping powers of two.

On this CPU (``--hardware cpu``) the link rates come from runtime/probe.py's ``io_probe``.
``disk`` is read the way runtime/offload_pool.py reads it: with ``O_DIRECT`` (``direct=True``,
the runtime's default), straight from the disk into the pool's buffer in two parts in flight,
priced at the probe's ``direct_bw`` measured the same way. Such a read bypasses the page cache,
so "warm" (the store's pages cached) is the same read as "cold", a DMA transfer that overlaps
the compute. Buffered reads (``direct=False``, the pool's fallback where the file system refuses
O_DIRECT) use the buffered cold rate, and from a warm page cache the page-cache rate: that read
is a memcpy by the kernel on the same two cores, so it does not overlap the compute and is
priced as N (c + t) + o. ``host`` uses the memcpy rate and does not overlap either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from compiler.cost.hardware import Chip
from compiler.spec import Spec
from ir.errors import CostError
from ir.module import Module

#: Host link and disk read bandwidths (bytes/s, one direction, achieved) of the table's chips,
#: for chips whose table entry or file does not give ``host_bw`` / ``disk_bw``.
#: A100: PCIe 4.0 x16 (31.5 GB/s theoretical; ~25 GB/s pinned-memory copies); H100/H200:
#: PCIe 5.0 x16 (63 GB/s theoretical; ~50 GB/s); disk: one PCIe 4.0 NVMe SSD (~7 GB/s sequential
#: read, e.g. Samsung 990 Pro's 7.45 GB/s datasheet figure). TPU hosts: PCIe 3.0 x16 (~12 GB/s).
LINKS: dict[str, tuple[float, float]] = {
    "a100-80g": (25e9, 7e9), "h100": (50e9, 7e9), "h100-80g": (50e9, 7e9), "h200": (50e9, 7e9),
    "tpu-v4": (12e9, 3e9), "tpu-v5e": (12e9, 3e9), "tpu-v5p": (12e9, 3e9),
}
MODES = ("host", "disk")
#: On this CPU a prefetched read does not fully hide behind the compute: XLA's threads take both
#: cores, and the reader's Python thread (GIL, wake-ups, issuing the next part) runs between
#: them, so the disk idles part of each layer. Measured (bench/offload.py, SmolLM2 f32 at batch
#: 128, O_DIRECT, three runs 2026-11-30 21:33 and 2026-12-01 00:22 / 01:05 UTC, exclusive lock):
#: prefetch - resident = 0.48, 0.48, 0.71 of N x (layer bytes / 1.68 GB/s). The exposed share
#: of the shorter of read and compute per layer; 0 on accelerators (a DMA engine does the copy).
CPU_EXPOSED = 0.55


def link_bandwidth(chip: Chip, mode: str, cache: str = "cold", direct: bool = True) -> tuple[float, str]:
    """Bytes/s of the link ``mode`` streams over on ``chip``, and where the figure comes from.
    ``direct``: disk reads with O_DIRECT (the page cache, hence ``cache``, plays no part)."""
    if mode not in MODES:
        raise CostError(f"unknown offload mode {mode!r}", hint="use host or disk")
    if cache not in ("cold", "warm"):
        raise CostError(f"unknown page-cache state {cache!r}", hint="use cold or warm")
    if chip.name == "cpu":
        from runtime.probe import io_probe  # JAX-free, but it reads and writes a scratch file

        rec = io_probe()
        io, when = rec.figures, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rec.measured_at))
        if mode == "host":
            return float(io["memcpy_bw"]), f"memcpy rate measured by runtime/probe.py {when}"
        if direct and chip.disk_bw:  # a rate given with the chip (bench/offload.py: sampled in its own run)
            return float(chip.disk_bw), "the chip's disk_bw (O_DIRECT)"
        if direct and "direct_bw" in io:
            return float(io["direct_bw"]), (f"O_DIRECT read rate, 2 parts in flight, measured by runtime/probe.py "
                                            f"{when}; the page cache plays no part")
        key = "page_cache_bw" if cache == "warm" else "disk_bw"
        return float(io[key]), (f"buffered {'page-cache' if cache == 'warm' else 'cold disk'} read rate measured "
                                f"by runtime/probe.py {when}")
    own = getattr(chip, "host_bw" if mode == "host" else "disk_bw", 0.0)
    if own:
        return float(own), f"the chip's {mode}_bw"
    if chip.name in LINKS:
        return LINKS[chip.name][0 if mode == "host" else 1], "compiler/cost/offload.py LINKS"
    raise CostError(f"chip {chip.name!r} has no {'host link' if mode == 'host' else 'disk'} bandwidth",
                    hint=f"give {mode}_bw (bytes/s) in the chip file")


@dataclass(frozen=True)
class OffloadEstimate:
    mode: str
    batch: int
    layers: int
    layer_bytes: int  # one layer's weights, per device, in the served format
    global_bytes: int  # the weights outside the layers (kept resident)
    link_bw: float
    link_source: str
    compute_s: float  # c: one layer of the resident step
    transfer_s: float  # t: one layer over the link
    other_s: float  # o: the step outside the layers
    resident_step_s: float
    offload_step_s: float
    no_prefetch_step_s: float
    resident_bytes: int  # the resident run's memory per device (weights + KV + activations)
    offload_bytes: int  # streamed: global weights + 2 layer buffers + KV + activations
    hbm_bytes: int
    overlaps: bool  # whether the transfer runs beside the compute (False: buffered warm or host on CPU)
    direct: bool = True  # disk reads with O_DIRECT (no page cache: warm = cold)

    @property
    def fraction(self) -> float:
        """Offloaded throughput as a fraction of resident throughput (with prefetch)."""
        return self.resident_step_s / self.offload_step_s if self.offload_step_s > 0 else 0.0

    @property
    def resident_fits(self) -> bool:
        return self.resident_bytes <= self.hbm_bytes

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "fraction": self.fraction,
                "resident_fits": self.resident_fits}


def _layer_bytes(module: Module, n_devices: int) -> tuple[int, int]:
    """Weight bytes per device of one layer (params stacked along ``N``) and of the rest."""
    fn = module.entries[0]
    per_layer = glob = 0
    for p in fn.params_with_role("weight"):
        t = p.type
        n = t.nbytes()
        if t.dims and t.dims[0].name == "N":
            per_layer += n // t.shape[0]
        else:
            glob += n
    return per_layer // n_devices, glob // n_devices


def estimate_offload(spec: Spec, chip: Chip, mode: str, batch: int, cost_model: str = "calibrated",
                     cache: str = "cold", direct: bool = True) -> OffloadEstimate:
    """The decode step of ``spec`` at ``batch`` (KV cache of serve.seq positions), resident and
    with the layers streamed over ``mode``'s link (disk: read with O_DIRECT unless ``direct``
    is False, when ``cache`` says whether the page cache holds the store)."""
    from compiler.cost.autolayout import evaluate

    s = replace(spec, serve=replace(spec.serve, phase="decode", batch=batch))
    choice = evaluate(s, chip, keep_modules=True, model=cost_model)
    legal = [c for c in choice.candidates if c.legal]
    if not legal:
        raise CostError(f"no legal layout for decode at batch {batch}: {choice.candidates[0].illegal}")
    cand = choice.chosen or legal[0]
    est, module = cand.est, cand.module
    assert module is not None  # evaluate(keep_modules=True)
    n = est.layers
    c = est.per_layer.time
    o = max(est.step_time_s - n * c, 0.0)
    layer_bytes, glob = _layer_bytes(module, module.n_devices)
    bw, source = link_bandwidth(chip, mode, cache, direct)
    t = layer_bytes / bw
    overlaps = not (chip.name == "cpu" and (mode == "host" or (cache == "warm" and not (direct and mode == "disk"))))
    no_pref = n * (c + t) + o
    # with prefetch: the first layer's read is exposed, then each layer costs the slower of its
    # read and compute, plus (on this CPU) the part of the faster one that does not overlap
    exposed = CPU_EXPOSED if chip.name == "cpu" else 0.0
    pref = t + (n - 1) * (max(c, t) + exposed * min(c, t)) + c + o if overlaps else no_pref
    mem = est.memory
    streamed = glob + 2 * layer_bytes + mem.kv + mem.activations
    return OffloadEstimate(mode, batch, n, layer_bytes, glob, bw, source, c, t, o, est.step_time_s, pref, no_pref,
                           mem.total, streamed, chip.hbm_bytes, overlaps, direct)


def batch_for_fraction(spec: Spec, chip: Chip, mode: str, target: float = 0.9, max_batch: int = 1 << 16,
                       cost_model: str = "calibrated", cache: str = "cold") -> tuple[int | None, list[OffloadEstimate]]:
    """The smallest power-of-two batch at which streaming reaches ``target`` of resident
    throughput (None up to ``max_batch``), and the estimates swept on the way."""
    seen: list[OffloadEstimate] = []
    b = 1
    while b <= max_batch:
        e = estimate_offload(spec, chip, mode, b, cost_model, cache)
        seen.append(e)
        if e.fraction >= target:
            return b, seen
        b *= 2
    return None, seen


def format_offload(spec: Spec, chip: Chip, e: OffloadEstimate, target: float, at: int | None,
                   swept: list[OffloadEstimate]) -> str:
    ms = 1e3
    lines = [
        f"{spec.model.name} decode on {chip.name}, weights {spec.serve.weights}, --offload {e.mode}, batch {e.batch}, "
        f"KV {spec.serve.seq} positions",
        f"  per layer: weights {e.layer_bytes / 1e6:.1f} MB over {e.link_bw / 1e9:.2f} GB/s ({e.link_source}) "
        f"= {e.transfer_s * ms:.3f} ms; compute {e.compute_s * ms:.3f} ms"
        + ("" if e.overlaps else " (transfer does not overlap compute here: same cores)"),
        f"  step: resident {e.resident_step_s * ms:.2f} ms; streamed {e.offload_step_s * ms:.2f} ms with prefetch, "
        f"{e.no_prefetch_step_s * ms:.2f} ms without; {e.fraction:.0%} of resident throughput",
        f"  memory per device: resident {e.resident_bytes / 1e9:.2f} GB, streamed {e.offload_bytes / 1e9:.2f} GB "
        f"(global weights + 2 layer buffers + KV + activations), capacity {e.hbm_bytes / 1e9:.1f} GB: "
        + ("the model fits resident; offloading is not needed" if e.resident_fits
           else "the model does not fit resident; offloading is needed"),
        "  " + (f"streaming reaches {target:.0%} of resident throughput at batch {at}" if at is not None
                else f"streaming stays below {target:.0%} of resident throughput up to batch {swept[-1].batch}"),
        "  batch sweep (fraction of resident; * = the streamed run does not fit the device either): "
        + ", ".join(f"{s.batch}: {s.fraction:.0%}" + ("*" if s.offload_bytes > s.hbm_bytes else "") for s in swept),
    ]
    return "\n".join(lines) + "\n"


def explain_offload(spec: Spec, chip: Chip, mode: str, target: float, cost_model: str, as_json: bool) -> int:
    """The ``explain --offload`` report (text or JSON); the exit code."""
    import json

    if not 0 < target <= 1:
        raise CostError(f"--offload-target must be in (0, 1], got {target}")
    e = estimate_offload(spec, chip, mode, spec.serve.batch, cost_model)
    at, swept = batch_for_fraction(spec, chip, mode, target, cost_model=cost_model)
    if as_json:
        print(json.dumps({**e.to_json(), "target": target, "batch_for_target": at,
                          "sweep": {s.batch: s.fraction for s in swept}}, indent=2))
    else:
        print(format_offload(spec, chip, e, target, at, swept), end="")
    return 0
