"""The cost model's predicted step time against the measured one, on one CPU device.

For the small example models (and one wider variant, so that some steps are compute- or
bandwidth-bound rather than overhead-bound) at several batch sizes, prefill and decode: compile
for one device, price the module with the ``cpu`` chip (runtime/probe.py measures matmul FLOP/s,
memory bandwidth and per-kernel overhead once and caches them), run the entry with
runtime.lower_jax.JaxExecutor and take the median of warm runs. Prints predicted, measured and
the ratio predicted / measured (1.0 = exact; below 1 means the model is a lower bound, as it is
meant to be). No assertions.

    .venv/bin/python bench/cost_model_vs_measured.py [--repeats 9] [--refresh-probe]
"""

from __future__ import annotations

import _harness

_harness.use_cpu_devices(1)

import argparse
import statistics

from _harness import ROOT, median_s

import numpy as np

from compiler.build import BuildConfig, build_module
from compiler.cost.hardware import chip_from_mapping
from compiler.cost.model import nominal_params, price
from compiler.driver import compile_module
from compiler.spec import apply_overrides, load_spec
from runtime.generate import zero_caches
from runtime.lower_jax import JaxExecutor
from runtime.probe import measure_cpu
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--refresh-probe", action="store_true", help="measure the CPU again instead of the cache")
    a = ap.parse_args()
    probe = measure_cpu(refresh=a.refresh_probe)
    chip = chip_from_mapping(probe, "cpu probe")
    print(f"cpu chip: {chip.peak('f32') / 1e9:.1f} GFLOP/s f32 matmul, {chip.hbm_bw / 1e9:.2f} GB/s memory, "
          f"{chip.op_overhead_s * 1e6:.2f} us per kernel ({probe['source']}); median of {a.repeats} warm runs; "
          f"prompt {PROMPT}, decode cache {CACHE}, f32 weights")
    head = (f"{'model':10} {'phase':8} {'batch':>5} {'predicted ms':>13} {'measured ms':>12} {'ratio':>6}  "
            f"{'bound by':10}")
    print(head)
    print("-" * len(head))
    ratios = []
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
                c = est.per_step
                bound = max((("compute", c.compute), ("memory", c.memory), ("overhead", c.overhead)),
                            key=lambda kv: kv[1])[0]
                ratio = est.step_time_s / measured
                ratios.append(ratio)
                print(f"{spec.model.name:10} {phase:8} {b:5d} {est.step_time_s * 1e3:13.4f} {measured * 1e3:12.4f} "
                      f"{ratio:6.2f}  {bound:10}", flush=True)
    print(f"ratio predicted/measured: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
