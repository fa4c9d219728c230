"""Fits the calibrated cost model's efficiencies (compiler/cost/efficiency.py) to the paper's
eight measured configurations, and prints the constants with the residual of every row.

Data: ``../shared/reference/paper-calibration.csv`` (Pope et al. Tables 2-3: PaLM 540B and 62B
on TPU v4, the published layout of each row), and nothing else: the paper's other tables and
figures are kept for checking how the fit generalises. Every row is compiled with its published
layout and the paper's overlap (looped collective einsums), then priced with candidate
efficiencies; the fit minimises the squared log ratio predicted / measured (scipy least squares,
bounded: efficiencies in (0, 1], latencies >= 0). Paste the printed ``Efficiency(...)`` into
``CALIBRATED`` in compiler/cost/efficiency.py.

    .venv/bin/python bench/calibrate.py --fix link=1   # the constants in efficiency.py
"""

from __future__ import annotations

import _harness  # noqa: F401  (repo on sys.path)

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.cost.autolayout import _compile
from compiler.cost.efficiency import Efficiency
from compiler.cost.hardware import CHIPS
from compiler.cost.model import price
from compiler.spec import apply_overrides, load_spec
from ir.module import Module

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "compiler" / "cost" / "paper-calibration.csv"  # a copy of ../shared/reference/paper-calibration.csv
#: name, lower, upper, start
PARAMS = (("flops", 0.05, 1.0, 0.6), ("matmul_half", 0.0, 4096.0, 64.0), ("hbm", 0.05, 1.0, 0.7),
          ("link", 0.05, 1.0, 0.7), ("step_latency_s", 0.0, 1e-4, 2e-6), ("layer_overhead_s", 0.0, 1e-3, 1e-5))
#: starting points of the fit, in PARAMS order (the first is PARAMS' own)
STARTS = (tuple(p[3] for p in PARAMS), (0.8, 256.0, 0.4, 1.0, 1e-7, 0.0), (0.9, 1000.0, 0.5, 1.0, 0.0, 0.0))
#: held at these values, not fitted (see main's --fix)
FIXED: dict[str, float] = {}


@dataclass(frozen=True)
class Row:
    label: str
    module: Module
    n_params: int
    steps: int  # decode steps priced (1 for prefill)
    measured_s: float
    overlap: str


def load_rows(path: Path, overlap: str) -> list[Row]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            spec = apply_overrides(load_spec(ROOT / "examples" / f"{r['model']}.model"),
                                   mesh=r["mesh"].replace(";", ","), phase=r["phase"], batch=r["batch"],
                                   seq=r["context_tokens"], ffn=r["ffn"], attn=r["attn"], weights=r["weights"],
                                   overlap=overlap)
            m, n = _compile(spec)
            steps = int(r["generated_tokens"]) if r["phase"] == "decode" else 1
            label = f"{r['model']} {r['chips']:>2} chips {r['phase']:7} B={r['batch']:<4} {r['weights']:4} {r['ffn']}/{r['attn']}"
            rows.append(Row(label, m, n, steps, float(r["measured_total_s"]), overlap))
    return rows


def efficiency(x: np.ndarray, source: str = "") -> Efficiency:
    vals = {name: float(v) for (name, *_), v in zip(PARAMS, x)}
    return Efficiency(**{**vals, **FIXED}, source=source)


def predicted(row: Row, eff: Efficiency) -> float:
    return price(row.module, CHIPS["tpu-v4"], row.n_params, eff, row.overlap).step_time_s * row.steps


def fit(rows: list[Row], max_evals: int | None = None) -> tuple[Efficiency, list[float]]:
    from scipy.optimize import least_squares

    lo = np.array([p[1] for p in PARAMS])
    hi = np.array([p[2] for p in PARAMS])
    scale = np.array([max(p[2], 1e-12) for p in PARAMS])

    def residuals(z: np.ndarray) -> np.ndarray:
        eff = efficiency(z * scale)
        return np.array([math.log(predicted(r, eff) / r.measured_s) for r in rows])

    best = None
    for start in STARTS:  # the squared log residuals have local minima: keep the lowest of a few starts
        z0 = np.clip(np.array(start) / scale, lo / scale, hi / scale)
        r = least_squares(residuals, z0, bounds=(lo / scale, hi / scale), x_scale="jac", max_nfev=max_evals)
        if best is None or r.cost < best.cost:
            best = r
    assert best is not None
    x = best.x * scale
    eff = efficiency(x)
    return eff, [predicted(r, eff) / r.measured_s for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--overlap", default="looped", help="overlap the rows are compiled with (the paper's: looped)")
    ap.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                    help="hold an efficiency at a value instead of fitting it, e.g. link=1")
    ap.add_argument("--max-evals", type=int, help="stop the fit after this many evaluations (smoke runs)")
    ap.add_argument("--leave-one-out", action="store_true",
                    help="also fit on every 7 rows and predict the 8th (an estimate of generalisation)")
    args = ap.parse_args()
    for item in args.fix:
        name, _, value = item.partition("=")
        FIXED[name] = float(value)
    rows = load_rows(args.csv, args.overlap)
    eff, ratios = fit(rows, args.max_evals)
    bound = [predicted(r, Efficiency()) / r.measured_s for r in rows]
    print(f"fit of {len(rows)} rows of {args.csv.name} (overlap = {args.overlap}):")
    print(f"  {'row':58} {'measured s':>11} {'calibrated':>11} {'ratio':>7} {'bound ratio':>12}")
    for r, q, b in zip(rows, ratios, bound):
        print(f"  {r.label:58} {r.measured_s:11.4g} {q * r.measured_s:11.4g} {q:7.3f} {b:12.3f}")
    rms = math.sqrt(sum(math.log(q) ** 2 for q in ratios) / len(ratios))
    print(f"  rms log residual {rms:.3f}; worst ratio {max(ratios, key=lambda q: abs(math.log(q))):.3f}")
    if args.leave_one_out:
        print("leave one out: fitted on the other rows, this row predicted")
        held = []
        for i, r in enumerate(rows):
            e, _ = fit(rows[:i] + rows[i + 1:], args.max_evals)
            q = predicted(r, e) / r.measured_s
            held.append(q)
            print(f"  {r.label:58} {r.measured_s:11.4g} {q * r.measured_s:11.4g} {q:7.3f}")
        print(f"  held-out ratios {min(held):.3f}-{max(held):.3f}; "
              f"{sum(abs(q - 1) <= 0.25 for q in held)} of {len(held)} within +-25%")
    fields = ", ".join(f"{name}={getattr(eff, name):.4g}" for name, *_ in PARAMS)
    if FIXED:
        print(f"  held: {', '.join(f'{k}={v:g}' for k, v in FIXED.items())}")
    print(f"Efficiency({fields})")


if __name__ == "__main__":
    main()
