"""Pipeline stages in a spec: a mesh axis named ``stage`` splits the layer stack.

The layouts and everything the default pipeline decides (padding, fusion, the cost model's
``auto`` choices) are decided for the mesh *without* the stage axis; passes/pipeline_stages.py
then adds the axis. This module says how a spec splits into those two parts and which
``pipeline-stages`` options its ``serve.microbatches`` gives.
"""

from __future__ import annotations

from dataclasses import replace

from compiler.spec import MeshSpec, Spec
from passes.pipeline_stages import STAGE_AXIS


def stages_of(spec: Spec) -> int:
    """The stage count of ``spec``'s mesh (1: no stage axis)."""
    return dict(spec.mesh.axes).get(STAGE_AXIS, 1)


def inner_mesh(spec: Spec) -> tuple[tuple[str, int], ...]:
    """The mesh axes inside one stage (what the layouts use)."""
    return tuple((a, s) for a, s in spec.mesh.axes if a != STAGE_AXIS)


def inner_spec(spec: Spec) -> Spec:
    """``spec`` on one stage's devices (the mesh without its stage axis)."""
    if STAGE_AXIS not in spec.mesh.names:
        return spec
    return replace(spec, mesh=MeshSpec(inner_mesh(spec)))


def microbatch_options(spec: Spec) -> tuple[int, int]:
    """(prefill, decode) micro-batch counts; 0 is ``auto`` (the pass picks, knowing the layout)."""
    mb = spec.serve.microbatches
    if mb == "auto":
        return 0, 0
    p, d = mb.split(":")
    return int(p), int(d)


def stage_pass(spec: Spec, tokens: int = 0, greedy: bool = False) -> str:
    """The ``pipeline-stages`` pass for ``spec`` ('' without a stage axis). ``tokens`` > 0: the
    decode entry makes that many tokens per row in one call, the pipeline kept full across
    them (``greedy``: without the sampling branch); see passes/pipeline_generate.py."""
    if STAGE_AXIS not in spec.mesh.names:
        return ""
    p, d = microbatch_options(spec)
    gen = f",tokens={tokens},greedy={int(greedy)}" if tokens else ""
    return f"pipeline-stages{{stages={stages_of(spec)},prefill={p},decode={d}{gen}}}"
