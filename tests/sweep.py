"""The configuration sweep of issue 16: random model x mesh (<= 8 devices) x layout x phase x
weight format x overlap through the default pipeline and the numpy SPMD simulator.

Each configuration either compiles and its simulated logits (prefill, then teacher-forced
decode steps) equal the float64 reference of the same model unsharded and unpadded (with the
same fusion and int8 rewrites: compiler/driver.py ``unsharded_pipeline``) within 1e-9
normwise, or it is refused with a LayoutError that the independent layout oracle
(partition_helpers.expected_layout_problems) predicts. Anything else is a failure.

    .venv/bin/python tests/sweep.py --seed 0 --count 10000     # `make fuzz` runs this

prints the figures (configurations, ran, refusals by kind, padded dims, largest error, time).
tests/test_sweep.py runs a sample in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.driver import WEIGHT_DTYPES, compile_module, default_pipeline, unsharded_pipeline  # noqa: E402
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec  # noqa: E402
from ir.errors import LayoutError  # noqa: E402
from partition_helpers import build, check_layout_error, expected_layout_problems, mesh_str, rel_err  # noqa: E402
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS  # noqa: E402

#: float64 on both sides: only the sharding's reassociation separates them
TOL = 1e-9
#: pad-heads / pad-dims statistics: "E padded 12 -> 16", "kv heads padded 3 -> 4", ...
_PADDED = re.compile(r"(.+) padded \d+ -> \d+$")


@dataclass(frozen=True)
class Config:
    spec: Spec
    prompt: int
    steps: int

    def describe(self) -> str:
        m, s = self.spec.model, self.spec.serve
        return (f"{m} mesh={mesh_str(self.spec.mesh.axes)} ffn={s.ffn} attn={s.attn} kv={s.kv} phase={s.phase} "
                f"batch={s.batch} weights={s.weights} overlap={s.overlap} prompt={self.prompt} steps={self.steps}")


def random_config(rng: random.Random) -> Config:
    """One configuration; every size is free (nothing is chosen to divide the mesh)."""
    sizes: list[int] = []
    for _ in range(rng.randint(1, 3)):
        room = 8 // (sizes[0] * (sizes[1] if len(sizes) > 1 else 1) if sizes else 1)
        sizes.append(rng.randint(1, max(1, room)))
    mesh = tuple(zip("xyz", sizes))
    attention = rng.choice(["mha", "mqa", "gqa"])
    heads = rng.randint(1, 12)
    kv_heads = {"mha": heads, "mqa": 1}.get(attention) or rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    d_head = rng.choice([2, 4])
    model = ModelSpec(
        f"s-{attention}", layers=rng.randint(1, 2), d_model=rng.randint(2, 24), heads=heads, kv_heads=kv_heads,
        d_head=d_head, d_ff=rng.randint(2, 40), vocab=rng.randint(5, 40),
        block=rng.choice(["serial", "parallel"]), mlp=rng.choice(["gelu", "gelu-tanh", "swiglu"]),
        norm=rng.choice(["layernorm", "rmsnorm"]), bias=rng.choice(["none", "mlp", "all"]),
        tie_embeddings=rng.random() < 0.5, rotary_dim=rng.choice([0, d_head]),
        rotary_style=rng.choice(["half", "interleaved"]))
    serve = ServeSpec(phase=rng.choice(["prefill", "decode"]), batch=rng.randint(1, 9), seq=8,
                      ffn=rng.choice(FFN_LAYOUTS), attn=rng.choice(ATTN_LAYOUTS),
                      weights=rng.choice(["f32", "bf16", "int8"]), overlap=rng.choice(["none", "looped", "bidirectional"]),
                      kv=rng.choice(["auto", "shard", "replicate", "pad"]), hardware="tpu-v4")
    return Config(Spec(model, MeshSpec(mesh), serve), prompt=rng.randint(1, 3), steps=rng.randint(0, 2))


@dataclass
class Outcome:
    ran: bool
    refusal: str = ""
    err: float = 0.0
    padded: tuple[str, ...] = ()
    pipeline: str = ""


def check(cfg: Config, seed: int = 0) -> Outcome:
    """Compiles and simulates ``cfg``; raises AssertionError on a mismatch or an unpredicted refusal."""
    from runtime.generate import ReferenceExecutor, generate
    from runtime.spmd import SpmdExecutor
    from runtime.weights import random_tokens, random_weights, round_to

    spec, m, s = cfg.spec, cfg.spec.model, cfg.spec.serve
    mesh = spec.mesh.axes
    cache = cfg.prompt + cfg.steps
    raw = build(m, s.batch, cfg.prompt, cache, mesh, dtype=WEIGHT_DTYPES[s.weights])
    # kv = auto is never refused (it pads when nothing divides); the others as the oracle says
    problems = [] if s.kv == "auto" else expected_layout_problems(m, s.batch, mesh, s.ffn, s.attn, pad=True, kv=s.kv)
    try:
        pipeline = default_pipeline(spec)
        res = compile_module(raw, pipeline)
    except LayoutError as e:
        assert problems, f"LayoutError the oracle does not predict: {e.message}"
        p = check_layout_error(e, problems, mesh)
        return Outcome(False, refusal=f"{p.dim} ({p.what}, kv={s.kv})")
    assert not problems, f"compiled although the oracle predicts {problems}"
    same = compile_module(raw, unsharded_pipeline(pipeline)).module
    weights = round_to(random_weights(raw.function("prefill"), seed=seed), WEIGHT_DTYPES[s.weights])
    tokens = random_tokens(s.batch, cache, m.vocab, seed=seed)
    ref = generate(ReferenceExecutor(same), weights, tokens, cfg.prompt).logits
    got = generate(SpmdExecutor(res.module), weights, tokens, cfg.prompt).logits
    assert got.shape == ref.shape == (s.batch, cache, m.vocab), (got.shape, ref.shape)
    err = rel_err(got, ref)
    assert err <= TOL, f"SPMD logits differ from the reference: {err:.3e} > {TOL:g}\npipeline {pipeline}"
    padded = tuple(m.group(1) for r in res.run.records for k in r.stats if (m := _PADDED.match(k)))
    return Outcome(True, err=err, padded=padded, pipeline=pipeline)


@dataclass
class Figures:
    configs: int = 0
    ran: int = 0
    failures: list[str] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)
    padded: Counter = field(default_factory=Counter)
    max_err: float = 0.0
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"configurations {self.configs}: ran {self.ran} (equal to the reference, largest normwise error "
                 f"{self.max_err:.2e}), refused {sum(self.refusals.values())}, failures {len(self.failures)}, "
                 f"{self.seconds:.0f} s"]
        lines += [f"  refused {n:5d}: {k}" for k, n in self.refusals.most_common()]
        lines += [f"  padded  {n:5d}: {k}" for k, n in sorted(self.padded.items())]
        lines += [f"  FAILURE: {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def sweep(seed: int, count: int, progress: bool = False, shard: tuple[int, int] = (0, 1),
          stop_after_s: float = float("inf")) -> Figures:
    """Configurations 0 .. count-1 of ``seed`` (those ``i % n == k`` for ``shard`` = (k, n): the
    same sequence split over processes), stopping early after ``stop_after_s``."""
    rng = random.Random(seed)
    fig = Figures()
    t0 = time.perf_counter()
    for i in range(count):
        cfg = random_config(rng)
        if i % shard[1] != shard[0]:
            continue
        if time.perf_counter() - t0 > stop_after_s:
            break
        try:
            out = check(cfg, seed=i)
        except KeyboardInterrupt:  # stopped early: the figures so far
            break
        except Exception as e:  # noqa: BLE001 — every failure is reported with its configuration
            fig.configs += 1
            fig.failures.append(f"#{i}: {type(e).__name__}: {e}\n    {cfg.describe()}")
            if progress:
                print(f"FAILURE {fig.failures[-1]}", file=sys.stderr, flush=True)
            continue
        fig.configs += 1
        if out.ran:
            fig.ran += 1
            fig.max_err = max(fig.max_err, out.err)
            fig.padded.update({d: 1 for d in out.padded})
            fig.padded.update({"(any dim)": 1} if out.padded else {})
        else:
            fig.refusals[out.refusal] += 1
        if progress and fig.configs % 500 == 0:
            print(f"... {i + 1} configurations, {len(fig.failures)} failures, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    fig.seconds = time.perf_counter() - t0
    return fig


def to_json(fig: Figures) -> dict:
    return {"configs": fig.configs, "ran": fig.ran, "failures": fig.failures, "refusals": dict(fig.refusals),
            "padded": dict(fig.padded), "max_err": fig.max_err, "seconds": fig.seconds}


def merge(parts: list[dict]) -> Figures:
    """Figures of processes that split one sweep (seconds: the slowest process, wall time)."""
    fig = Figures()
    for p in parts:
        fig.configs += p["configs"]
        fig.ran += p["ran"]
        fig.failures += p["failures"]
        fig.refusals.update(p["refusals"])
        fig.padded.update(p["padded"])
        fig.max_err = max(fig.max_err, p["max_err"])
        fig.seconds = max(fig.seconds, p["seconds"])
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--shard", default="0/1", help="k/n: this process checks configurations i with i % n == k")
    ap.add_argument("--stop-after", type=float, default=float("inf"), help="seconds, then the figures so far")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--merge", type=Path, nargs="*", help="print the merged figures of these --json files")
    a = ap.parse_args()
    if a.merge:
        fig = merge([json.loads(p.read_text()) for p in a.merge])
        print(f"sweep --seed {a.seed} --count {a.count}, {len(a.merge)} processes")
        print(fig.report())
        return 1 if fig.failures else 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it with the figures so far
    k, n = map(int, a.shard.split("/"))
    fig = sweep(a.seed, a.count, progress=True, shard=(k, n), stop_after_s=a.stop_after)
    if a.json:
        a.json.write_text(json.dumps(to_json(fig)))
    print(f"sweep --seed {a.seed} --count {a.count}" + (f" (stopped after {fig.configs})" if fig.configs < a.count else ""))
    print(fig.report())
    return 1 if fig.failures else 0


if __name__ == "__main__":
    sys.exit(main())
