"""From a spec and weights to a runtime ModelRunner: one layout, a module per program shape.

The runner (runtime/model_runner.py) compiles a step for every (phase, batch, length) it is
used at; this module is the compiler half of that: the callback that builds and compiles the
module for a shape. ``auto`` layouts are resolved once, at the decode shape, and then fixed, so
every shape takes the same prepared weights (the runner checks it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np

from compiler.build import BuildConfig, build_module
from compiler.driver import WEIGHT_DTYPES, compile_module, default_pipeline
from compiler.spec import Spec
from compiler.stages import inner_mesh, inner_spec, stage_pass
from ir.errors import SpecError
from ir.module import Module
from runtime.model_runner import ModelRunner


#: Runner phases of the K-token generation program (length = K): sampled, and every row greedy.
GENERATE_PHASES = ("generate", "generate_greedy")


def fixed_layout(spec: Spec, batch: int) -> Spec:
    """``spec`` with every ``auto`` setting that shapes the weights (ffn, attn, kv, expert_axes)
    resolved by the cost model for decode at ``batch``: resolved per phase, a prefill could pick
    other expert axes than decode, and its program would take other weights."""
    s = spec.serve
    if spec.mesh.n_devices == 1:
        return spec
    probe = replace(inner_spec(spec), serve=replace(s, phase="decode", batch=batch))  # layouts: inside a stage
    if s.ffn == "auto" or s.attn == "auto":
        from compiler.cost.autolayout import resolve_auto

        from compiler.pipelines import dim_pad_options

        resolved, choice = resolve_auto(probe)
        chosen = resolved.serve
        # the runner does not pad the batch (module_for): keep the fastest fitting layout that
        # takes this batch as it is, when the cost model's pick would need padded rows
        if choice is not None and "batch" in dim_pad_options(resolved):
            takes = [c for c in choice.candidates if c.legal and c.est.fits and "batch" not in dim_pad_options(c.spec)]
            if takes:
                chosen = takes[0].spec.serve
        probe = replace(probe, serve=replace(probe.serve, ffn=chosen.ffn, attn=chosen.attn))
    if probe.serve.kv == "auto" or probe.serve.expert_axes == "auto":
        from compiler.cost.autolayout import resolve_kv
        from compiler.cost.moe import resolve_expert_axes
        from compiler.pipelines import settle_kv

        probe = resolve_expert_axes(resolve_kv(settle_kv(probe)))
    p = probe.serve
    return replace(spec, serve=replace(s, ffn=p.ffn, attn=p.attn, kv=p.kv, expert_axes=p.expert_axes))


def module_for(spec: Spec, phase: str, batch: int, length: int, cache_len: int, logits: str = "last") -> Module:
    """The compiled module with one entry: ``phase`` at ``batch`` x ``length`` over a cache of
    ``cache_len`` positions, through the spec's default pipeline. On a mesh with stages,
    ``generate`` (``generate_greedy``: every row greedy) is the decode entry that makes
    ``length`` tokens per row in one call with the pipeline kept full across them
    (passes/pipeline_generate.py)."""
    gen = phase in GENERATE_PHASES
    if gen and not stage_pass(spec):
        raise SpecError(f"the {phase} program needs a mesh with a stage axis")
    greedy, tokens = phase == "generate_greedy", length if gen else 0
    phase, length = ("decode", 1) if gen else (phase, length)
    s = replace(spec.serve, phase=phase, batch=batch, seq=length if phase == "prefill" else cache_len)
    sp = replace(spec, serve=s)
    cfg = BuildConfig(batch, length, cache_len, (phase,), WEIGHT_DTYPES[s.weights], logits)
    module = build_module(spec.model, cfg, inner_mesh(spec))  # pipeline-stages adds the stage axis
    # the runner and the serving engine choose their batches (ModelRunner.valid_batch): no padded rows
    passes = default_pipeline(sp, pad_batch=False)
    if gen:
        passes = ",".join((default_pipeline(inner_spec(sp), pad_batch=False), stage_pass(sp, tokens, greedy)))
    return compile_module(module, passes).module


def make_runner(spec: Spec, weights: Mapping[str, np.ndarray], cache_len: int, batch: int = 1,
                split_layers: bool = True) -> ModelRunner:
    """A runner for ``spec``'s model and layout (``auto`` resolved at decode x ``batch``)."""
    fixed = fixed_layout(spec, batch)

    def build(phase: str, b: int, length: int, context: int | None = None) -> Module:
        return module_for(fixed, phase, b, length, context or cache_len)

    return ModelRunner(build, weights, cache_len, spec.model.vocab, split_layers=split_layers)


def weight_types(spec: Spec) -> dict:
    """The checkpoint-facing weight params (names -> types) of the unpartitioned model."""
    cfg = BuildConfig(1, 1, 1, ("decode",), WEIGHT_DTYPES[spec.serve.weights])
    fn = build_module(spec.model, cfg).function("decode")
    return {p.name: p.type for p in fn.params_with_role("weight")}
