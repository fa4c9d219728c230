"""Generation on an accelerator: decode tokens/s of bf16 and int8 weights against the HBM roofline,
prefill MFU, and transformers (torch, bf16, same device, greedy) as the named baseline.

    python bench/gpu_generate.py [--hidden 3072 --layers 12 ...] [--hbm-bw 4.8e12 --peak 989e12] [--json F]

A random Llama checkpoint (transformers' own init, saved as bf16 safetensors) is generated on the
spot: no model hub is reachable from the device machine. Decode: per-step medians of the
on-device loop at each batch; roofline = (weight + KV-cache bytes) / HBM bandwidth. Prefill MFU =
2 * params * tokens / time-to-first-token / peak bf16 FLOP/s. Defaults: NVIDIA H200 (4.8 TB/s
HBM3e, 989 TFLOP/s dense bf16, from NVIDIA's H200 datasheet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def make_checkpoint(d: Path, a: argparse.Namespace) -> int:
    """A random bf16 Llama in ``d``; returns its parameter count."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                                   num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    return sum(p.numel() for p in m.parameters())


def hf_decode_ms(d: Path, batch: int, prompt: int, new: int) -> float:
    """transformers' greedy decode step (bf16, eager, on the device): (t(new) - t(1)) / (new - 1)."""
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
    ids = torch.randint(3, m.config.vocab_size, (batch, prompt), device=dev)

    def run(n: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    t1 = statistics.median(run(1) for _ in range(3))
    tn = statistics.median(run(new) for _ in range(3))
    del m
    if dev == "cuda":
        torch.cuda.empty_cache()  # JAX allocates next, in the same process
    return (tn - t1) / (new - 1) * 1e3


def einshard_runs(d: Path, fmt: str, batches: list[int], a: argparse.Namespace, params: int) -> list[dict]:
    from compiler.generate_cmd import load
    from compiler.generation import make_runner
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import bucket
    from runtime.sampling import SamplingParams

    ns = argparse.Namespace(checkpoint=d, spec=None, mesh=None, ffn=None, attn=None, weights=fmt, sets=[],
                            devices=None, coordinator=None, num_processes=None, process_id=None)
    ld = load(ns, need_tokenizer=False)
    out = []
    greedy = SamplingParams(0.0, 0, 1.0, 0)
    for B in batches:
        prompts = [[3 + (7 * i + j) % (a.vocab - 3) for j in range(a.prompt)] for i in range(B)]
        runner = make_runner(ld.spec, ld.weights, bucket(a.prompt) + bucket(a.new), batch=B)
        gen = Generator(runner)
        req = GenerateRequest.of(prompts, greedy, a.new, ())
        compile_s = gen.compile(req, batch=B)
        steps = []
        for _ in range(a.repeats):
            res = gen.generate(req, batch=B)
            steps.append(res.step_ms_p50)
        step = statistics.median(steps)
        moved = runner.weight_bytes() + runner.cache_bytes(B, res.context or None)
        out.append({"weights": fmt, "batch": B, "step_ms": step, "tok_s": B * 1e3 / step,
                    "weight_bytes": runner.weight_bytes(), "roofline": moved / a.hbm_bw / (step / 1e3),
                    "compile_s": compile_s})
        print(f"einshard {fmt:5s} decode b{B:<4d} {step:8.3f} ms/step  {B * 1e3 / step:9.1f} tok/s  "
              f"{out[-1]['roofline']:6.1%} of the HBM roofline  (compile {compile_s:.1f} s)", flush=True)
    if fmt == "bf16":  # prefill MFU: one long prompt batch, first token only
        P, B = a.prefill, a.prefill_batch
        prompts = [[3 + (11 * i + j) % (a.vocab - 3) for j in range(P)] for i in range(B)]
        runner = make_runner(ld.spec, ld.weights, bucket(P) + 16, batch=B)
        gen = Generator(runner)
        req = GenerateRequest.of(prompts, greedy, 1, ())
        gen.compile(req, batch=B)
        ttft = statistics.median(gen.generate(req, batch=B).ttft_s for _ in range(a.repeats))
        mfu = 2 * params * P * B / ttft / a.peak
        out.append({"weights": fmt, "phase": "prefill", "batch": B, "prompt": P, "ttft_s": ttft, "mfu": mfu})
        print(f"einshard {fmt:5s} prefill {B}x{P}: {ttft * 1e3:8.1f} ms  MFU {mfu:.1%}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", help="decode batches (default 1,16,64; with --tiny 1,2)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-bw", type=float, default=4.8e12)
    ap.add_argument("--peak", type=float, default=989e12)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and one repeat (smoke test, any machine)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.tiny:
        a.hidden, a.ffn, a.layers, a.heads, a.kv_heads, a.vocab = 64, 128, 2, 4, 2, 256
        a.prompt, a.new, a.prefill, a.prefill_batch, a.repeats = 8, 8, 32, 2, 1
    batches = [int(b) for b in (a.batches or ("1,2" if a.tiny else "1,16,64")).split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "llama"
        params = make_checkpoint(d, a)
        print(f"random Llama: {params / 1e9:.2f} B params, {a.layers} layers, hidden {a.hidden}", flush=True)
        hf = {} if a.skip_hf else {B: hf_decode_ms(d, B, a.prompt, a.new) for B in batches}
        for B, ms in hf.items():
            print(f"transformers bf16 decode b{B:<4d} {ms:8.3f} ms/step", flush=True)
        for fmt in ("bf16", "int8"):
            rows += einshard_runs(d, fmt, batches, a, params)
    for r in rows:
        if "step_ms" in r and r["batch"] in hf:
            r["vs_transformers"] = hf[r["batch"]] / r["step_ms"]
            print(f"ratio einshard {r['weights']} / transformers bf16 decode tok/s, batch {r['batch']}: "
                  f"{r['vs_transformers']:.2f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"params": params, "transformers_ms": hf, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
