"""Achieved-efficiency terms of a chip: what separates a measured step from its roofline bound.

The cost model has two modes (``explain --model``):

* ``bound``: peak FLOP/s, peak HBM and link bandwidth, no latencies; every prediction is a lower
  bound on the measured time (the guarantee the model had before calibration);
* ``calibrated`` (the default): the same pricing rules with the chip's fitted efficiencies: the
  achieved fraction of peak FLOP/s, which falls for matmuls whose smallest local dimension is
  small (``flops * n / (n + matmul_half)``; a looped collective einsum's n is that of the chunk
  one loop step multiplies), the achieved HBM and link bandwidth, a latency per
  ring step of every collective (a K-way ring takes K - 1 steps), a fixed overhead per layer,
  and the time to convert one element of a weight stored narrower than 32 bits (int8 through its
  dequantize, bf16) inside the dot that reads it: a CPU multiplies such weights in f32, so the
  convert is compute on every element the step reads, not bytes (0 where the chip multiplies
  them natively, as the TPU's MXU does).

The constants are fitted by ``bench/calibrate.py`` to the eight rows of
``../shared/reference/paper-calibration.csv`` and nothing else (the paper's other tables and
figures are kept for checking how well they generalise); the fit's provenance is stored with
them. ``cpu`` is measured per machine, so its fit is too: ``bench/cost_model_vs_measured.py
--smollm2`` (or ``--fit``) stores it beside the probe's cache with the probe it was fitted
against and the probe's machine key; its fractions then apply to any probe measured under that
key (CPU model, cores, jax and jaxlib versions), so re-probing a stale cache keeps the fit. A
chip without a calibration is priced at its bound in both modes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

from ir.errors import CostError

MODELS = ("calibrated", "bound")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the chip's peaks and the fixed costs a bound leaves out."""

    flops: float = 1.0  # fraction of peak FLOP/s reached by large matmuls
    matmul_half: float = 0.0  # smallest local matmul dim (rows, cols or contraction) at half of ``flops``
    hbm: float = 1.0  # fraction of peak HBM bandwidth
    link: float = 1.0  # fraction of the interconnect bandwidth
    step_latency_s: float = 0.0  # per ring step of a collective (K - 1 steps for K participants)
    layer_overhead_s: float = 0.0  # per call of a layer body (and of the entry)
    convert_s: float = 0.0  # per element of a narrow (int8, bf16) weight converted inside its dot
    source: str = "bound: peak rates, no latencies"

    def __post_init__(self) -> None:
        for k in ("flops", "hbm", "link"):
            v = getattr(self, k)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise CostError(f"efficiency {k} must be in (0, 1], got {v!r}")
        for k in ("matmul_half", "step_latency_s", "layer_overhead_s", "convert_s"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise CostError(f"efficiency {k} must be >= 0, got {v!r}")

    @property
    def is_bound(self) -> bool:
        return (self.flops, self.matmul_half, self.hbm, self.link, self.step_latency_s,
                self.layer_overhead_s, self.convert_s) == (1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)

    def flops_fraction(self, smallest_dim: float) -> float:
        """Achieved fraction of peak for a matmul whose smallest local dimension is ``smallest_dim``.
        A matrix-vector product (one row or column) is its own kernel, bound by the memory it
        streams (XLA CPU's gemv; on a TPU one row costs what streaming the weight does), so it
        keeps ``flops``: priced by the shape curve, a CPU fit could not make an 8-row decode
        matmul slower than a 1-row one, as XLA CPU runs them (2-3x)."""
        if self.matmul_half <= 0 or math.isinf(smallest_dim) or smallest_dim <= 1:  # inf: a sum, no matmul
            return self.flops
        return self.flops * smallest_dim / (smallest_dim + self.matmul_half)


BOUND = Efficiency()

#: Fitted by ``bench/calibrate.py`` (see its output for the residual of every row).
CALIBRATED: dict[str, Efficiency] = {
    # The link is held at the paper's 270 GB/s: fitting it too gives an rms of 0.020 with the link
    # at 0.20, which hides 2D's partly looped collectives less than 1D's fully looped ones and
    # flips 4 of the 8 published choices to 1D-WS.
    "tpu-v4": Efficiency(
        flops=0.773, matmul_half=274.6, hbm=0.4552, link=1.0, step_latency_s=0.0, layer_overhead_s=0.0,
        source="bench/calibrate.py --fix link=1, 8 rows of paper-calibration.csv (looped): rms log residual "
               "0.128, rows 0.75-1.15x"),
}


#: The ``cpu`` chip's fit (bench/cost_model_vs_measured.py --fit), next to runtime/probe.py's cache.
CPU_FIT_FILE = "cpu-efficiency.json"
#: The probe's figures a CPU fit depends on: a re-measured probe makes the fit stale.
PROBE_KEYS = ("flops_f32", "flops_bf16", "hbm_bw", "op_overhead_s")


def save_cpu_fit(path: Path, probe: Mapping, eff: Efficiency, key: Mapping | None = None) -> None:
    """Stores a CPU fit with the probe figures it was fitted against and, given, the probe's
    machine key (runtime/probe.py ``machine_key``): a keyed fit holds its fractions of whatever
    probe is measured later under that key; an unkeyed one only with these exact figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {"probe": {k: probe[k] for k in PROBE_KEYS if k in probe}, "efficiency": asdict(eff)}
    if key is not None:
        data.update(key=dict(key), fitted_at=time.time())
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic, as the probe's cache: a reader never sees half a fit (it would drop it)


def load_cpu_fit(path: Path, probe: Mapping, key: Mapping | None = None) -> Efficiency | None:
    """The stored CPU fit, if it applies to this probe (else None: stale, absent or unreadable,
    and the chip is priced by the calibrated table or the bound, which explain names). A keyed fit
    applies while ``key`` (the current probe's) equals its own: its efficiencies are fractions of
    the probe, so a probe measured again on the same machine and software keeps them, and its
    source says which probe it was fitted against. An unkeyed fit applies only to the exact
    figures it was stored with."""
    try:
        data = json.loads(path.read_text())
        eff = Efficiency(**data["efficiency"])
        fitted = {k: data["probe"][k] for k in PROBE_KEYS if k in data["probe"]}
        if "key" in data:
            if key is None or dict(data["key"]) != dict(key):
                return None
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(data.get("fitted_at", 0.0))))
            return replace(eff, source=f"{eff.source}; stored {when}, fitted against a probe of "
                                       f"{fitted['flops_f32'] / 1e9:.4g} GFLOP/s f32, {fitted['hbm_bw'] / 1e9:.4g} GB/s "
                                       f"(applied as fractions of the current probe's "
                                       f"{probe['flops_f32'] / 1e9:.4g} GFLOP/s, {probe['hbm_bw'] / 1e9:.4g} GB/s)")
        if fitted != {k: probe[k] for k in PROBE_KEYS if k in probe}:
            return None
        return eff
    except (OSError, ValueError, KeyError, TypeError, CostError):
        return None


def efficiency_for(chip: object, model: str = "calibrated") -> Efficiency:
    """The efficiencies ``model`` prices ``chip`` (a hardware.Chip or a chip name) with: the chip
    file's ``[efficiency]`` table, else the table's calibration, else the bound."""
    if model not in MODELS:
        raise CostError(f"unknown cost model {model!r}", hint="use calibrated or bound")
    if model == "bound":
        return BOUND
    own = getattr(chip, "efficiency", None)
    if isinstance(own, Efficiency):
        return own
    return CALIBRATED.get(str(getattr(chip, "name", chip)), BOUND)


__all__ = ["BOUND", "CALIBRATED", "CPU_FIT_FILE", "Efficiency", "MODELS", "efficiency_for", "load_cpu_fit",
           "save_cpu_fit"]
