"""The compile driver: spec (or IR file) -> resolved spec -> module -> pipeline -> result.

It decides ``auto`` settings with the cost model (compiler/cost/autolayout.py) and then asks
compiler/pipelines.py for shapes and the default pipeline, whose functions it re-exports. The
CLI and the benchmarks call it; it does no printing itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from compiler import hints, pipelines
from compiler.cost.autolayout import resolve_auto, resolve_kv
from compiler.cost.moe import resolve_expert_axes
from compiler.pipelines import (WEIGHT_DTYPES, CompileResult, build_for, compile_config, compile_module,
                                pad_options, run_config, settle_kv, unsharded_pipeline)
from compiler.spec import Spec, load_spec
from compiler.stages import inner_spec, stage_pass
from ir.module import Module
from ir.parser import parse_file

__all__ = ["WEIGHT_DTYPES", "CompileResult", "build_for", "compile_config", "compile_module", "default_pipeline",
           "head_multiple", "load_input", "pad_options", "resolved", "run_config", "unsharded_pipeline"]


def load_input(path: str | Path) -> Spec | Module:
    """A ``.ir`` file is parsed as IR; anything else is read as a model spec."""
    p = Path(path)
    if p.suffix == ".ir":
        return parse_file(p)
    return load_spec(p)


def resolved(spec: Spec) -> Spec:
    """``spec`` with ``auto`` layouts replaced by the cost model's choice for its phase, then
    ``kv = auto`` likewise (shard, replicate or pad the grouped-query heads), then a mixture of
    experts' ``expert_axes = auto`` (compiler/cost/moe.py). With a stage axis
    they are decided for the devices of one stage (compiler/stages.py)."""
    if stage_pass(spec):
        return replace(resolved(inner_spec(spec)), mesh=spec.mesh)
    if spec.mesh.n_devices > 1 and (spec.serve.ffn == "auto" or spec.serve.attn == "auto"):
        spec = resolve_auto(spec)[0]
    out = resolve_expert_axes(resolve_kv(settle_kv(spec)))
    s = out.serve
    hints.record({"ffn": s.ffn, "attn": s.attn, "kv": s.kv, "weights": s.weights, "overlap": s.overlap,
                  "phase": s.phase})  # errors from here on do not suggest what is in force
    return out


def default_pipeline(spec: Spec | None, rewrites: bool = True, pad_batch: bool = True) -> str:
    """compiler/pipelines.py ``default_pipeline`` for ``spec`` with its ``auto`` settings resolved."""
    return pipelines.default_pipeline(None if spec is None else resolved(spec), rewrites, pad_batch)


def head_multiple(spec: Spec) -> int:
    """compiler/pipelines.py ``head_multiple`` for ``spec`` with its ``auto`` settings resolved."""
    return pipelines.head_multiple(resolved(spec))


def _fuse_attention(spec: Spec) -> bool:
    return pipelines.fuse_attention(resolved(spec))
