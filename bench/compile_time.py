"""Compile time against depth: PaLM 540B with 2 layers (the baseline) and with all 118.

The layer body is one function applied by ``scan`` over weights stacked along N, so building the
IR and running the default pipeline should cost the same whatever the layer count: the ratio
118-layer / 2-layer should stay near 1. Each configuration is built and compiled a few times and
the median is reported. Nothing here asserts on time; read the ratio.

    python bench/compile_time.py [--repeats 5] [--spec examples/palm-540b.model]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _harness import ROOT

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from ir.printer import print_module

BASELINE_LAYERS = 2


def measure(spec_path: Path, layers: int, repeats: int) -> dict:
    """Median seconds of: building the module, running the default pipeline, both together."""
    spec = apply_overrides(load_spec(spec_path), sets=[f"model.layers={layers}"])
    build, passes, total = [], [], []
    lines = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        module = build_for(spec, compile_config(spec))
        t1 = time.perf_counter()
        result = compile_module(module, default_pipeline(spec))
        t2 = time.perf_counter()
        build.append(t1 - t0)
        passes.append(t2 - t1)
        total.append(t2 - t0)
        lines = print_module(result.module).count("\n")
    return {"build": statistics.median(build), "passes": statistics.median(passes),
            "total": statistics.median(total), "ir_lines": lines, "pipeline": default_pipeline(spec)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "palm-540b.model")
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args(argv)

    full = load_spec(args.spec).model.layers
    measure(args.spec, BASELINE_LAYERS, 1)  # warm-up: imports, grammar, caches
    rows = [(n, measure(args.spec, n, args.repeats)) for n in (BASELINE_LAYERS, full)]
    base = rows[0][1]["total"]

    print(f"compile time of {args.spec.name} by layer count "
          f"(median of {args.repeats}; baseline: {BASELINE_LAYERS} layers)")
    print(f"pipeline: {rows[0][1]['pipeline']}")
    print(f"{'layers':>7} {'build ms':>10} {'passes ms':>10} {'total ms':>10} {'IR lines':>9} {'ratio':>7}")
    for n, r in rows:
        print(f"{n:>7} {r['build'] * 1e3:>10.2f} {r['passes'] * 1e3:>10.2f} {r['total'] * 1e3:>10.2f} "
              f"{r['ir_lines']:>9} {r['total'] / base:>6.2f}x")
    print(f"ratio {full}-layer / {BASELINE_LAYERS}-layer total compile time: {rows[1][1]['total'] / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
