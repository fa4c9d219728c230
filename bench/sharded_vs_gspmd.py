"""einshard's shard_map programs vs GSPMD on the same shardings, per layout, prefill and decode.

For every FFN x attention layout on the 8-device mesh x=2, y=2, z=2 (simulated CPU devices):

* einshard: the module after the default pipeline (shard, insert-collectives, cleanup), lowered
  by runtime.lower_jax (one ``jax.shard_map`` inside ``jax.jit``, collectives as einshard placed
  them);
* GSPMD: ``jax.jit`` of the *unsharded* module's JAX lowering (the same op rules, no collectives)
  with ``in_shardings`` / ``out_shardings`` = NamedSharding of einshard's param / result
  PartitionSpecs, so XLA's SPMD partitioner chooses its own collectives for the same layouts at
  the boundary.

Prints one row per (layout, phase): the median of several warm step times of each (ms), the
ratio einshard / GSPMD, the collectives of each compiled HLO by kind (AG all-gather, RS
reduce-scatter, AR all-reduce, A2A all-to-all, CP collective-permute; the layer loop counts
once), and the max normwise difference of their logits (a sanity check). No assertions.

The 8 devices share the machine's cores, so the times say little about real speed-ups; the
collective counts are the interesting part.

    .venv/bin/python bench/sharded_vs_gspmd.py [--repeats 15] [--d-model 256] [--d-ff 1024]
"""

from __future__ import annotations

import _harness

_harness.use_cpu_devices(8)

import argparse
import os

from _harness import ROOT, median_s

import jax
import numpy as np
from jax.sharding import NamedSharding

from compiler.build import BuildConfig, build_module
from compiler.driver import compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from runtime.generate import zero_caches
from runtime.kernels import Interpreter
from runtime.lower_jax import JaxBackend, JaxExecutor, partition_spec, to_device
from runtime.weights import random_tokens, random_weights

FFN_LAYOUTS = ("1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz")
ATTN_LAYOUTS = ("heads", "batch")
KINDS = {"all-gather(": "AG", "reduce-scatter(": "RS", "all-reduce(": "AR", "all-to-all(": "A2A",
         "collective-permute(": "CP"}


def counts(hlo: str) -> str:
    c = {short: hlo.count(" " + op) for op, short in KINDS.items()}
    return " ".join(f"{k}{v}" for k, v in c.items() if v) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--cache", type=int, default=64)
    ap.add_argument("--layouts", nargs="+", metavar="FFN/ATTN",
                    help="only these layouts, e.g. 2d-ws/batch wg-xyz/heads (default: all 10; the smoke test runs two)")
    a = ap.parse_args()
    layouts = [(f, t) for f in FFN_LAYOUTS for t in ATTN_LAYOUTS]
    if a.layouts:
        wanted = [tuple(x.split("/", 1)) for x in a.layouts]
        if unknown := [f"{f}/{t}" for f, t in wanted if (f, t) not in layouts]:
            ap.error(f"unknown layouts {unknown}; choose from {[f'{f}/{t}' for f, t in layouts]}")
        layouts = wanted

    base = apply_overrides(load_spec(ROOT / "examples" / "tiny-mqa.model"), mesh="x=2,y=2,z=2",
                           sets=[f"model.d_model={a.d_model}", f"model.d_ff={a.d_ff}", "model.heads=8",
                                 "model.d_head=32", "model.vocab=512"])
    model = base.model
    cfg = BuildConfig(a.batch, a.prompt, a.cache, ("prefill", "decode"))
    unsharded = build_module(model, cfg, ())
    weights = random_weights(unsharded.function("prefill"), 0)
    tokens = random_tokens(a.batch, a.prompt + 1, model.vocab, 0)
    print(f"model {model.name}: {model.layers} layers, d_model {model.d_model}, d_ff {model.d_ff}, {model.heads} heads "
          f"x {model.d_head}, 1 kv head, {model.block} block, {model.mlp}; batch {a.batch}, prompt {a.prompt}, "
          f"cache {a.cache}; mesh x=2,y=2,z=2 on {jax.devices()[0].platform} "
          f"({jax.device_count()} devices, {os.cpu_count()} cores); jax {jax.__version__}; "
          f"median of {a.repeats} warm runs")
    head = (f"{'ffn':7} {'attn':6} {'phase':8} {'einshard ms':>11} {'gspmd ms':>9} {'ratio':>6}  "
            f"{'einshard collectives':26} {'gspmd collectives':26} {'max rel diff':>12}")
    print(head)
    print("-" * len(head))
    for ffn, attn in layouts:
        spec = apply_overrides(base, ffn=ffn, attn=attn)
        # the layouts alone: the GSPMD side runs the same unfused float program
        pipeline = default_pipeline(spec, rewrites=False)
        sharded = compile_module(build_module(model, cfg, spec.mesh.axes), pipeline).module
        ex = JaxExecutor(sharded)
        mesh = ex.entries["prefill"].mesh
        for phase in ("prefill", "decode"):
            fn = sharded.function(phase)
            ufn = unsharded.function(phase)
            L = a.prompt if phase == "prefill" else 1
            host = {**weights, **zero_caches(sharded, phase),
                    "tokens": tokens[:, :L] if phase == "prefill" else tokens[:, a.prompt:a.prompt + 1],
                    "pos": np.broadcast_to(np.arange(L, dtype=np.int32) if phase == "prefill"
                                           else np.full((1,), a.prompt, np.int32), (a.batch, L)).copy()}
            shardings = [NamedSharding(mesh, partition_spec(p.type)) for p in fn.params]
            out_shardings = tuple(NamedSharding(mesh, partition_spec(t)) for t in fn.result_types)

            def make_args(fn=fn, shardings=shardings):
                return [jax.device_put(to_device(np.asarray(host[p.name]), p.type), s)
                        for p, s in zip(fn.params, shardings)]

            # einshard: shard_map program
            ein = ex.entries[phase].jitted
            ein_hlo = ein.lower(*make_args()).compile().as_text()
            ein_ms = 1e3 * median_s(lambda args: ein(*args), make_args, a.repeats)
            ein_out = np.asarray(ein(*make_args())[0], np.float64)

            # GSPMD: the unsharded program, jitted with the same boundary shardings
            interp = Interpreter(unsharded, JaxBackend())

            def program(*args, ufn=ufn, interp=interp):
                return interp.call(ufn, args)

            donate = tuple(i for i, p in enumerate(ufn.params) if p.role == "cache")
            gs = jax.jit(program, in_shardings=tuple(shardings), out_shardings=out_shardings,
                         donate_argnums=donate)
            gs_hlo = gs.lower(*make_args()).compile().as_text()
            gs_ms = 1e3 * median_s(lambda args: gs(*args), make_args, a.repeats)
            gs_out = np.asarray(gs(*make_args())[0], np.float64)
            diff = float(np.abs(ein_out - gs_out).max() / (np.abs(gs_out).max() or 1.0))
            print(f"{ffn:7} {attn:6} {phase:8} {ein_ms:11.2f} {gs_ms:9.2f} {ein_ms / gs_ms:6.2f}  "
                  f"{counts(ein_hlo):26} {counts(gs_hlo):26} {diff:12.1e}", flush=True)


if __name__ == "__main__":
    main()
