"""``einshard run``: compile for prefill + decode, execute with JAX, check against the reference.

The reference is the numpy float64 interpreter on the *unpartitioned* module the builder emits,
so a check covers every pass of the pipeline as well as the lowering. Errors are reported
normwise: ``max_rel_err = max|jax - ref| / max|ref|`` over all logits (elementwise relative
error is meaningless near zero logits).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compiler.driver import (CompileResult, build_for, compile_module, default_pipeline, run_config,
                             unsharded_pipeline)
from compiler.spec import Spec
from passes.ledger import ledger
from passes.manager import Instrumentation

#: Default normwise tolerance by weight format, and why.
TOLERANCES = {
    # f32 matmuls over d_model/d_ff terms: rounding ~1e-7 per op, a few e-6 after a few layers.
    "f32": 1e-4,
    # bf16 keeps 8 significant bits (rel. step 2^-8 = 4e-3); errors add up over layers.
    "bf16": 5e-2,
    # int8 weights with per-channel scales: quantization error dominates (issue 4 states it).
    "int8": 1e-1,
}


@dataclass(frozen=True)
class RunOptions:
    steps: int = 4
    prompt_len: int | None = None
    seed: int = 0
    check: bool = False
    tolerance: float | None = None
    weights_dir: Path | None = None
    pipeline: str | None = None
    spmd: bool = False


@dataclass
class RunReport:
    spec: Spec
    options: RunOptions
    compiled: CompileResult
    batch: int
    prompt_len: int
    cache_len: int
    timings: dict[str, float] = field(default_factory=dict)
    last_tokens: list[int] = field(default_factory=list)
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    spmd_max_rel_err: float | None = None
    tolerance: float | None = None
    ok: bool = True
    #: Mixture of experts with a capacity: expert assignments dropped in the run (prefill + decode
    #: steps, all layers), per executor (jax, reference); absent when nothing can drop.
    moe_dropped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "ok": self.ok,
            "checked": self.options.check,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "tolerance": self.tolerance,
            "spmd_max_rel_err": self.spmd_max_rel_err,
            **({"moe_dropped_assignments": self.moe_dropped} if self.moe_dropped else {}),
            "ledger": [e.to_json() for e in ledger(self.compiled.module)],
            "config": {
                "spec": s.path,
                "model": asdict(s.model),
                "mesh": dict(s.mesh.axes),
                "serve": asdict(s.serve),
                "batch": self.batch,
                "prompt_len": self.prompt_len,
                "decode_steps": self.options.steps,
                "cache_len": self.cache_len,
                "weights": str(self.options.weights_dir) if self.options.weights_dir else f"random(seed={self.options.seed})",
                "pipeline": str(self.compiled.pipeline),
            },
            "timings_s": self.timings,
            "last_step_argmax": self.last_tokens,
        }


def load_weights(spec: Spec, module, opts: RunOptions) -> dict[str, Any]:
    from runtime.distributed import current
    from runtime.weights import random_weights

    fn = module.function("prefill")
    if opts.weights_dir is None and current() is not None:
        # across processes: each process makes only its devices' blocks (runtime/random_blocks.py)
        from runtime.random_blocks import lazy_random_weights

        return lazy_random_weights(fn, opts.seed, run_config(spec, opts.steps, opts.prompt_len).dtype)
    if opts.weights_dir is None:
        return random_weights(fn, opts.seed)
    from runtime.checkpoint import open_checkpoint

    types = {p.name: p.type for p in fn.params_with_role("weight")}
    return open_checkpoint(opts.weights_dir).load_weights(spec.model, types)


def execute(spec: Spec, opts: RunOptions, instr: Instrumentation = Instrumentation(),
            sink: Callable[[str], None] | None = None) -> RunReport:
    from runtime.generate import ReferenceExecutor, generate
    from runtime.distributed import is_lazy
    from runtime.kernels_moe import DROPPED
    from runtime.lower_jax import JaxExecutor
    from runtime.weights import random_tokens, round_to

    cfg = run_config(spec, opts.steps, opts.prompt_len)
    module = build_for(spec, cfg)
    pipeline = opts.pipeline if opts.pipeline is not None else default_pipeline(spec)
    t0 = time.perf_counter()
    compiled = compile_module(module, pipeline, instr, sink)
    report = RunReport(spec, opts, compiled, cfg.batch, cfg.prompt_len, cfg.cache_len)
    report.timings["compile_ir"] = time.perf_counter() - t0
    weights = load_weights(spec, module, opts)
    lazy = any(is_lazy(w) for w in weights.values())  # rounded as made, read block by block
    weights = weights if lazy else round_to(weights, cfg.dtype)
    tokens = random_tokens(cfg.batch, cfg.prompt_len + opts.steps, spec.model.vocab, opts.seed)
    t0 = time.perf_counter()
    ex = JaxExecutor(compiled.module)
    DROPPED.take()
    got = generate(ex, weights, tokens, cfg.prompt_len)
    report.timings["jax_first_run"] = time.perf_counter() - t0
    capped = spec.model.moe and spec.serve.moe_capacity > 0
    if capped:
        report.moe_dropped["jax"] = DROPPED.take(sync=True)  # JAX reports them through host callbacks
    t0 = time.perf_counter()
    generate(ex, weights, tokens, cfg.prompt_len)
    report.timings["jax_warm_run"] = time.perf_counter() - t0
    report.last_tokens = [int(t) for t in np.argmax(got.logits[:, -1], axis=-1)]
    if opts.check:
        t0 = time.perf_counter()
        DROPPED.take()
        if lazy:  # the reference needs them whole: made once, here (process 0 only)
            weights = {k: np.asarray(w) for k, w in weights.items()}
        ref = generate(ReferenceExecutor(module), weights, tokens, cfg.prompt_len)
        report.timings["reference"] = time.perf_counter() - t0
        if capped:
            report.moe_dropped["reference"] = DROPPED.take()
        diff = np.abs(got.logits.astype(np.float64) - ref.logits)
        scale = float(np.abs(ref.logits).max()) or 1.0
        report.max_abs_err = float(diff.max())
        report.max_rel_err = report.max_abs_err / scale
        report.tolerance = opts.tolerance if opts.tolerance is not None else TOLERANCES[spec.serve.weights]
        report.ok = bool(np.isfinite(report.max_rel_err) and report.max_rel_err <= report.tolerance)
        if opts.spmd:
            from runtime.spmd import SpmdExecutor

            t0 = time.perf_counter()
            sim = generate(SpmdExecutor(compiled.module), weights, tokens, cfg.prompt_len)
            report.timings["spmd"] = time.perf_counter() - t0
            # against the same program unsharded (int8 included), so only sharding can differ
            same = compile_module(module, unsharded_pipeline(pipeline)).module
            exact = generate(ReferenceExecutor(same), weights, tokens, cfg.prompt_len) if same.prepare else ref
            report.spmd_max_rel_err = float(np.abs(sim.logits - exact.logits).max()) / scale
            # the simulator computes in float64: only reassociation separates it from the reference
            report.ok = report.ok and report.spmd_max_rel_err <= 1e-9
    return report


def format_run(r: RunReport) -> str:
    s = r.spec
    mesh = ",".join(f"{a}={n}" for a, n in s.mesh.axes) or "1 device"
    lines = [
        f"model      {s.model.name}: {s.model.layers} layers, d_model {s.model.d_model}, "
        f"{s.model.heads} heads / {s.model.kv_heads} kv ({s.model.attention}), {s.model.block} block",
        f"mesh       {mesh}",
        f"shapes     batch {r.batch}, prompt {r.prompt_len}, {r.options.steps} decode steps, cache {r.cache_len}",
        f"weights    {s.serve.weights}, "
        + (str(r.options.weights_dir) if r.options.weights_dir else f"random (seed {r.options.seed})"),
        f"pipeline   {r.compiled.pipeline or '(none)'}",
        "timings    " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r.timings.items()),
        f"argmax     last step: {r.last_tokens}",
    ]
    if r.options.check:
        verdict = "OK" if r.ok else "MISMATCH"
        lines.append(f"check      {verdict}: max abs err {r.max_abs_err:.3e}, max rel err {r.max_rel_err:.3e} "
                     f"(tolerance {r.tolerance:.1e}, vs numpy float64 reference)")
        if r.spmd_max_rel_err is not None:
            lines.append(f"spmd       numpy SPMD simulator max rel err {r.spmd_max_rel_err:.3e} (tolerance 1e-9)")
    if r.moe_dropped:
        lines.append(f"experts    capacity_factor {s.serve.capacity_factor}: dropped assignments "
                     + ", ".join(f"{k} {v}" for k, v in r.moe_dropped.items()))
    return "\n".join(lines)
