"""The bare decode step of SmolLM2 per weight format, timed interleaved: an A/B without the
generation loop around it (bench/generate.py is the full comparison with transformers).

Each format's jitted step (params, token, position, donated caches) -> logits is compiled once,
then the formats take turns, one step each, for ``--steps`` rounds; the per-step median of
each and the time ratios against the first format are printed with the load average before
and after. Formats: ``f32``, ``bf16``, ``int8`` (int8 projections with per-row int8
activations: runtime.lower_jax.int8_dot, the CPU default) and ``int8w`` (int8 weights only,
the convert fused into an f32 gemv: ``JaxBackend(int8_activations=False)``); a ``y`` suffix
(``int8y``) compiles with XLA's default YNNPACK fusions instead of runtime/xla_options.py's
(the build that is wrong at batch >= 64: the fix's cost, A/B).

    flock -x /tmp/einshard.cpu python bench/int8_step.py --formats f32,int8,int8w --batches 1,8
    python bench/int8_step.py --tiny --steps 2                 # a tiny random Llama (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _harness import ROOT, load_avg, smollm2_gguf, tiny_llama, use_cpu_devices

use_cpu_devices(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="f32,int8", help="f32, bf16, int8, int8w (default f32,int8)")
    ap.add_argument("--batches", default="1,8", help="decode batches (default 1,8)")
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (default 30; 3 more warm up)")
    ap.add_argument("--context", type=int, default=64, help="KV cache positions (default 64)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (smoke test)")
    args = ap.parse_args()

    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.lower_jax import JaxBackend
    from runtime import xla_options
    from runtime.model_runner import enable_compile_cache
    from runtime.xla_options import tree_int8

    enable_compile_cache(str(ROOT / ".jax_cache"))
    tmp = tempfile.TemporaryDirectory()
    ck = open_checkpoint(tiny_llama(Path(tmp.name)) if args.tiny else smollm2_gguf())
    model = ck.model_spec()
    formats = args.formats.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    runs: dict[tuple[str, int], list] = {}
    for fmt in formats:
        spec = apply_overrides(Spec(model), weights=fmt.rstrip("wy"))
        runner = make_runner(spec, ck.load_weights(model, weight_types(spec)), args.context)
        if fmt == "int8w":
            runner.backend = JaxBackend(int8_activations=False)
        for B in batches:
            step = runner.step("decode", B, 1, args.context)
            f = xla_options.jit(step, tree_int8(runner.params) and not fmt.endswith("y"), donate_argnums=(3,))
            caches = runner.empty_cache(B, args.context)
            tok = jnp.zeros((B, 1), jnp.int32)
            pos = jnp.full((B, 1), 5, jnp.int32)
            t0 = time.perf_counter()
            comp = f.lower(runner.params, tok, pos, caches).compile()
            print(f"{fmt} batch {B}: compiled in {time.perf_counter() - t0:.1f} s, "
                  f"weights {runner.weight_bytes() / 1e6:.1f} MB", flush=True)
            runs[(fmt, B)] = [comp, runner.params, tok, pos, caches, []]
    print(f"load average before: {load_avg()}", flush=True)
    for B in batches:
        for r in range(args.steps + 3):
            for fmt in formats:
                run = runs[(fmt, B)]
                comp, params, tok, pos, caches, ts = run
                t0 = time.perf_counter()
                logits, run[4] = comp(params, tok, pos, caches)
                logits.block_until_ready()
                if r >= 3:
                    ts.append(time.perf_counter() - t0)
    print(f"load average after: {load_avg()}")
    for B in batches:
        base = statistics.median(runs[(formats[0], B)][5])
        for fmt in formats:
            ts = runs[(fmt, B)][5]
            ms = statistics.median(ts)
            print(f"batch {B} {fmt:<6} median {ms * 1e3:7.2f} ms  min {min(ts) * 1e3:7.2f} ms  "
                  f"time ratio {formats[0]}/{fmt} {base / ms:.2f}x")


if __name__ == "__main__":
    main()
