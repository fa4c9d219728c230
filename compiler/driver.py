"""The compile driver: spec (or IR file) -> module -> default or given pipeline -> result.

This is where serve settings turn into program shapes (BuildConfig) and where the default
pipeline for a spec is chosen. The CLI and the benchmarks call it; it does no printing itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compiler.build import BuildConfig, build_module
from compiler.spec import Spec, load_spec
from ir.errors import SpecError
from ir.module import Module
from ir.parser import parse_file
from passes.layouts import Layout
from passes.manager import Instrumentation, PassManager, PipelineRun
from passes.pipeline import Pipeline, format_pass, parse_pipeline

#: The float type of the program per weight format; int8 weights are quantized from bf16 by
#: quantize-int8 and dequantized to bf16 before each matmul.
WEIGHT_DTYPES = {"f32": "f32", "bf16": "bf16", "int8": "bf16"}


def load_input(path: str | Path) -> Spec | Module:
    """A ``.ir`` file is parsed as IR; anything else is read as a model spec."""
    p = Path(path)
    if p.suffix == ".ir":
        return parse_file(p)
    return load_spec(p)


def compile_config(spec: Spec) -> BuildConfig:
    """Shapes of the program `einshard compile` emits: the serve phase's entry only."""
    s = spec.serve
    dtype = WEIGHT_DTYPES[s.weights]
    if s.phase == "prefill":
        return BuildConfig(s.batch, s.seq, s.seq, ("prefill",), dtype, s.logits)
    return BuildConfig(s.batch, 1, s.seq, ("decode",), dtype, s.logits)


def run_config(spec: Spec, steps: int, prompt_len: int | None = None) -> BuildConfig:
    """Shapes for `einshard run`: prefill a prompt, then ``steps`` decode steps.

    For a prefill spec the prompt is ``seq`` tokens and the cache holds ``seq + steps``; for a
    decode spec the cache holds ``seq`` positions and the prompt fills all but ``steps`` of them.
    """
    s = spec.serve
    if steps < 0:
        raise SpecError(f"--steps must be >= 0, got {steps}")
    explicit_prompt = prompt_len is not None
    if prompt_len is None:
        prompt_len = s.seq if s.phase == "prefill" else s.seq - steps
        cache = s.seq + steps if s.phase == "prefill" else s.seq
    else:
        cache = max(prompt_len + steps, s.seq if s.phase == "decode" else 0)
    if prompt_len < 1 and explicit_prompt:
        raise SpecError(f"--prompt-len must be a token count >= 1, got {prompt_len}")
    if prompt_len < 1:
        raise SpecError(f"a decode cache of {s.seq} positions leaves no room for a prompt before {steps} steps",
                        hint="raise serve.seq or lower --steps")
    return BuildConfig(s.batch, prompt_len, cache, ("prefill", "decode"), WEIGHT_DTYPES[s.weights], s.logits)


def default_pipeline(spec: Spec | None, rewrites: bool = True) -> str:
    """The pipeline `einshard compile` and `run` use when --passes is not given.

    For the spec's phase (the cost model resolves ``auto`` layouts per phase): pad the
    (non-grouped) heads to a multiple of :func:`head_multiple`, the devices the layout shards
    them over, when they do not divide it (PaLM 540B's 48 heads on 4x4x4: to 64 under ``attn =
    heads`` or 1D-WS, as the paper does; not at all under 2D-WS with ``attn = batch``, whose 16
    head devices 48 divides), fuse a parallel block's projections, quantize the weights for
    ``weights = int8``, apply the layouts, expand the reshards into collectives, clean up, and
    for ``overlap = looped | bidirectional`` turn collective + einsum pairs into ring loops.
    One device: fusion, quantization and cleanup only. ``rewrites=False`` leaves out fusion,
    int8 and loops: the paper's layouts alone (the layout tests and docs/layouts.md use it).
    """
    if spec is None:
        return "cleanup"
    spec = _resolved(spec)
    m, s, n = spec.model, spec.serve, spec.mesh.n_devices
    parts = []
    mult = head_multiple(spec)
    if m.attention != "grouped" and m.heads % mult:
        parts.append(f"pad-heads{{multiple={mult}}}")
    if rewrites and m.block == "parallel":
        parts.append("fuse-parallel-block" if _fuse_attention(spec) else "fuse-parallel-block{attention=false}")
    if rewrites and s.weights == "int8":
        parts.append("quantize-int8")
    if n > 1:
        kv = "" if s.kv == "shard" else f",kv={s.kv}"
        parts += [f"shard{{ffn={s.ffn},attn={s.attn}{kv}}}", "insert-collectives"]
    parts.append("cleanup")
    if rewrites and n > 1 and s.overlap != "none":
        parts.append("collective-einsum" + ("{bidirectional=true}" if s.overlap == "bidirectional" else ""))
    return ",".join(parts)


def _resolved(spec: Spec) -> Spec:
    """``spec`` with ``auto`` layouts replaced by the cost model's choice for its phase."""
    if spec.mesh.n_devices > 1 and (spec.serve.ffn == "auto" or spec.serve.attn == "auto"):
        from compiler.cost.autolayout import resolve_auto

        return resolve_auto(spec)[0]  # see compiler/cost/autolayout.py
    return spec


def head_multiple(spec: Spec) -> int:
    """The device count that the default pipeline pads the query heads to a multiple of.

    Padding costs weight memory and bandwidth, so it goes only as far as the layout needs: all
    devices under ``attn = heads`` (Q's partial sums are reduce-scattered onto H over every
    axis, passes/shard.py ``settle``) or 1D-WS (its weights split the heads over every axis);
    else the wide weight axes (all but the first, passes/layouts.py ``Layout.wide``), since
    ``attn = batch`` moves Q to the cache's batch sharding anyway (heads dividing every device
    would only shorten that path, by less than the padded weights cost on PaLM 540B).
    ``auto`` layouts are resolved first.
    """
    spec = _resolved(spec)
    if spec.mesh.n_devices == 1 or spec.serve.attn == "heads":
        return spec.mesh.n_devices
    return _wide_devices(spec)


def _wide_devices(spec: Spec) -> int:
    """Devices of the wide weight dims (F, heads), as the layout places them."""
    layout = Layout(spec.serve.ffn, spec.serve.attn, spec.mesh.axes)
    return math.prod(layout.sizes[a] for a in layout.wide())


def _fuse_attention(spec: Spec) -> bool:
    """Grouped-query projections join the packed weight only when their K/V heads are sharded
    (else the query heads are sharded inside a group, which a packed dim cannot express)."""
    m, s = spec.model, spec.serve
    if m.attention != "grouped" or spec.mesh.n_devices == 1:
        return True
    if s.kv == "replicate":
        return False
    return m.kv_heads % _wide_devices(spec) == 0


def unsharded_pipeline(pipeline: str) -> str:
    """The passes of ``pipeline`` that change numerics or program shape but not the layout, as a
    pipeline for the unsharded module: the exact reference for a sharded, int8 program."""
    keep = ("fuse-parallel-block", "quantize-int8")
    parts = [format_pass(p) for p in parse_pipeline(pipeline).passes if p.name in keep]
    return ",".join(parts + ["cleanup"])


@dataclass
class CompileResult:
    input: Module
    run: PipelineRun
    pipeline: Pipeline

    @property
    def module(self) -> Module:
        return self.run.module


def compile_module(module: Module, pipeline: str, instr: Instrumentation = Instrumentation(),
                   sink: Callable[[str], None] | None = None) -> CompileResult:
    pipe = parse_pipeline(pipeline)
    return CompileResult(module, PassManager(pipe, instr, sink).run(module), pipe)


def build_for(spec: Spec, cfg: BuildConfig) -> Module:
    return build_module(spec.model, cfg, spec.mesh.axes)
