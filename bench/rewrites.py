"""The rewrite passes against the paper's layouts alone: step time, collective bytes, weight bytes.

On the 8-device mesh x=2, y=2, z=2 (simulated CPU devices), for a tiny-mqa-like model (parallel
block, multiquery, SwiGLU; d_model / d_ff raised so a step does some work), ffn=2d-ws,
attn=batch, each configuration is compiled with the default pipeline's passes and run with JAX
(runtime.lower_jax.JaxExecutor; weights through the module's load-time @prepare as
runtime.generate does):

* baseline: ``default_pipeline(spec, rewrites=False)`` (pad-heads if needed, shard, insert-collectives,
  cleanup), f32 weights;
* + fusion: fuse-parallel-block (packed projections);
* + int8: quantize-int8 (int8 weights + per-channel scales; the program computes in bf16);
* + looped / + bidirectional: collective-einsum (ppermute ring loops), one-way / both ways;
* all: ``default_pipeline`` of weights=int8, overlap=bidirectional.

Prints, per configuration and phase, the median of several warm step times (ms) and the ratio
to the baseline measured in the same run, with the normwise max difference of its logits from
the baseline's (int8 differs by its quantization error, about 1e-2); then the collective ledger's
bytes per device per step (passes.ledger) and the weight bytes per device (the entry's weight
params, local blocks), with and without fusion and int8, for this model and for PaLM 540B on
4x4x4. No assertions: read the ratios.

CPU devices do not overlap communication with computation (the 8 "devices" share the machine's
cores and a collective is a memory copy), so the looped collective einsums cannot hide anything
here: their cost is reported as measured, and is expected to be a slowdown (more, smaller steps).

    .venv/bin/python bench/rewrites.py [--repeats 25] [--d-model 256] [--d-ff 1024] [--configs baseline all ...]
"""

from __future__ import annotations

import _harness

_harness.use_cpu_devices(8)

import argparse
import os
import time

from _harness import ROOT, median_s

import jax
import numpy as np

from compiler.build import BuildConfig, build_module
from compiler.driver import WEIGHT_DTYPES, build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from passes.ledger import ledger
from passes.pipeline import format_pass, parse_pipeline
from runtime.generate import prepared_weights, zero_caches
from runtime.lower_jax import JaxExecutor
from runtime.weights import random_tokens, random_weights

# name -> (weights, overlap, rewrite passes kept from the full default pipeline)
CONFIGS = {
    "baseline": ("f32", "none", ()),
    "+ fusion": ("f32", "none", ("fuse-parallel-block",)),
    "+ int8": ("int8", "none", ("quantize-int8",)),
    "+ looped": ("f32", "looped", ("collective-einsum",)),
    "+ bidirectional": ("f32", "bidirectional", ("collective-einsum",)),
    "all": ("int8", "bidirectional", ("fuse-parallel-block", "quantize-int8", "collective-einsum")),
    # not a rewrite: the int8 program computes in bf16, so this separates int8 from bf16 compute
    "bf16, no rewrites": ("bf16", "none", ()),
}
REWRITES = ("fuse-parallel-block", "quantize-int8", "collective-einsum")


def pipeline_for(spec, keep: tuple[str, ...]) -> str:
    """The spec's default pipeline with only the rewrite passes in ``keep``."""
    passes = parse_pipeline(default_pipeline(spec)).passes
    return ",".join(format_pass(p) for p in passes if p.name not in REWRITES or p.name in keep)


def weight_bytes(module, entry: str) -> int:
    mesh = module.mesh_sizes
    return sum(p.type.local_nbytes(mesh) for p in module.function(entry).params_with_role("weight"))


def ledger_bytes(module) -> int:
    return sum(e.per_step for e in ledger(module))


def bytes_table(title: str, spec, build) -> None:
    """Ledger and weight bytes per device with and without fusion and int8 (no loops: a looped
    collective moves the same bytes), and the ledger's collectives per layer (norm statistics
    included): fusion moves the same bytes in fewer, larger collectives."""
    print(title)
    rows = [("baseline", "f32", ()), ("+ fusion", "f32", ("fuse-parallel-block",)),
            ("+ int8", "int8", ("quantize-int8",)), ("+ fusion + int8", "int8", ("fuse-parallel-block", "quantize-int8"))]
    if spec.serve.weights != "f32":  # e.g. PaLM: bf16 baseline
        rows = [(n, spec.serve.weights if w == "f32" else w, k) for n, w, k in rows]
    head = (f"  {'config':18} {'collectives/layer':>17} {'ledger B/dev/step':>18} {'ratio':>6} "
            f"{'weight B/dev':>16} {'ratio':>6}")
    print(head)
    base = None
    for name, w, keep in rows:
        s = apply_overrides(spec, weights=w, overlap="none")
        m = compile_module(build(s), pipeline_for(s, keep)).module
        entry = m.entries[0].name
        lb, wb = ledger_bytes(m), weight_bytes(m, entry)
        per_layer = sum(1 for e in ledger(m) if e.function.endswith("_layer"))
        base = base or (lb, wb)
        print(f"  {name:18} {per_layer:>17} {lb:>18,} {lb / base[0]:>6.3f} {wb:>16,} {wb / base[1]:>6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--cache", type=int, default=64)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), metavar="NAME", default=list(CONFIGS),
                    help="only these rows, baseline first (default: all; the smoke test runs one of each kind)")
    a = ap.parse_args()
    if a.configs[0] != "baseline":
        ap.error("--configs: the ratios are against 'baseline', which must come first")
    t_start = time.perf_counter()

    base = apply_overrides(load_spec(ROOT / "examples" / "tiny-mqa.model"), mesh="x=2,y=2,z=2", ffn="2d-ws",
                           attn="batch",
                           sets=[f"model.layers={a.layers}", f"model.d_model={a.d_model}", f"model.d_ff={a.d_ff}",
                                 "model.heads=8", "model.d_head=32", "model.vocab=512"])
    model = base.model
    tokens = random_tokens(a.batch, a.prompt + 1, model.vocab, 0)
    print(f"model {model.name}: {model.layers} layers, d_model {model.d_model}, d_ff {model.d_ff}, {model.heads} heads "
          f"x {model.d_head}, 1 kv head, {model.block} block, {model.mlp}; batch {a.batch}, prompt {a.prompt}, "
          f"cache {a.cache}; ffn 2d-ws, attn batch; mesh x=2,y=2,z=2 on {jax.devices()[0].platform} "
          f"({jax.device_count()} devices, {os.cpu_count()} cores); jax {jax.__version__}; "
          f"median of {a.repeats} warm runs; load average {os.getloadavg()[0]:.1f}")
    print("NOTE: CPU devices do not overlap communication with computation (the simulated devices share")
    print("      the cores; a collective is a copy), so looped/bidirectional collective einsums can only")
    print("      add work here. Their cost is reported as measured, not as it would be on TPUs/GPUs.")
    head = (f"{'config':16} {'decode ms':>10} {'ratio':>6} {'prefill ms':>11} {'ratio':>6} "
            f"{'max rel diff':>12}  pipeline")
    print(head)
    print("-" * (len(head) + 40))

    def build(spec, cfg=None):
        c = cfg or BuildConfig(a.batch, a.prompt, a.cache, ("prefill", "decode"), WEIGHT_DTYPES[spec.serve.weights])
        return build_module(spec.model, c, spec.mesh.axes)

    raw = None
    ref_logits = None
    base_ms: dict[str, float] = {}
    for name, (w, overlap, keep) in ((n, CONFIGS[n]) for n in a.configs):
        spec = apply_overrides(base, weights=w, overlap=overlap)
        pipeline = pipeline_for(spec, keep) if keep else default_pipeline(spec, rewrites=False)
        if name.startswith("bf16"):
            print("(reference row, not a rewrite: bf16 weights and compute, as the int8 program computes)")
        module = compile_module(build(spec), pipeline).module
        if raw is None:
            raw = random_weights(build(spec).function("prefill"), 0)
        ex = JaxExecutor(module)
        weights = prepared_weights(ex, raw)  # host -> @prepare (packing, int8) once, on device
        ms: dict[str, float] = {}
        logits = None
        for phase in ("decode", "prefill"):
            entry = ex.entries[phase]
            fn = module.function(phase)
            L = a.prompt if phase == "prefill" else 1
            inputs = {"tokens": tokens[:, :L] if phase == "prefill" else tokens[:, a.prompt:a.prompt + 1],
                      "pos": np.broadcast_to(np.arange(L, dtype=np.int32) if phase == "prefill"
                                             else np.full((1,), a.prompt, np.int32), (a.batch, L)).copy()}
            fixed = ex.prepare(phase, {**weights, **zero_caches(module, phase), **inputs})
            caches = {p.name for p in fn.params_with_role("cache")}

            def make_args(fn=fn, fixed=fixed, caches=caches, phase=phase):
                fresh = ex.prepare(phase, {**fixed, **{c: np.zeros_like(np.asarray(fixed[c])) for c in caches}})
                return [fresh[p.name] for p in fn.params]

            ms[phase] = 1e3 * median_s(lambda args: entry.jitted(*args), make_args, a.repeats)
            if phase == "decode":
                logits = np.asarray(ex.to_host(entry.jitted(*make_args())[0]), np.float64)
        if ref_logits is None:
            ref_logits, base_ms = logits, ms
        diff = float(np.abs(logits - ref_logits).max() / (np.abs(ref_logits).max() or 1.0))
        print(f"{name:16} {ms['decode']:10.2f} {ms['decode'] / base_ms['decode']:6.2f} {ms['prefill']:11.2f} "
              f"{ms['prefill'] / base_ms['prefill']:6.2f} {diff:12.1e}  {pipeline}", flush=True)

    print()
    bytes_table(f"bytes per device, decode entry, {model.name} above (f32 baseline; int8 rows compute in bf16):",
                base, lambda s: build(s, BuildConfig(a.batch, 1, a.cache, ("decode",), WEIGHT_DTYPES[s.serve.weights])))
    palm = apply_overrides(load_spec(ROOT / "examples" / "palm-540b.model"), mesh="x=4,y=4,z=4", ffn="2d-ws",
                           attn="batch", phase="decode")
    bytes_table("bytes per device, decode entry, PaLM 540B, 4x4x4, 2d-ws, attn batch, batch 64 (bf16 baseline):",
                palm, lambda s: build_for(s, compile_config(s)))
    print(f"\ntotal bench time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
