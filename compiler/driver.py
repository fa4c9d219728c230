"""The compile driver: spec (or IR file) -> module -> default or given pipeline -> result.

This is where serve settings turn into program shapes (BuildConfig) and where the default
pipeline for a spec is chosen. The CLI and the benchmarks call it; it does no printing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compiler.build import BuildConfig, build_module
from compiler.spec import Spec, load_spec
from ir.errors import SpecError
from ir.module import Module
from ir.parser import parse_file
from passes.manager import Instrumentation, PassManager, PipelineRun
from passes.pipeline import Pipeline, parse_pipeline

WEIGHT_DTYPES = {"f32": "f32", "bf16": "bf16", "int8": "bf16"}  # int8 is refused by check_supported


def load_input(path: str | Path) -> Spec | Module:
    """A ``.ir`` file is parsed as IR; anything else is read as a model spec."""
    p = Path(path)
    if p.suffix == ".ir":
        return parse_file(p)
    return load_spec(p)


def compile_config(spec: Spec) -> BuildConfig:
    """Shapes of the program `einshard compile` emits: the serve phase's entry only."""
    check_supported(spec)
    s = spec.serve
    dtype = WEIGHT_DTYPES[s.weights]
    if s.phase == "prefill":
        return BuildConfig(s.batch, s.seq, s.seq, ("prefill",), dtype)
    return BuildConfig(s.batch, 1, s.seq, ("decode",), dtype)


def run_config(spec: Spec, steps: int, prompt_len: int | None = None) -> BuildConfig:
    """Shapes for `einshard run`: prefill a prompt, then ``steps`` decode steps.

    For a prefill spec the prompt is ``seq`` tokens and the cache holds ``seq + steps``; for a
    decode spec the cache holds ``seq`` positions and the prompt fills all but ``steps`` of them.
    """
    check_supported(spec)
    s = spec.serve
    if steps < 0:
        raise SpecError(f"--steps must be >= 0, got {steps}")
    if prompt_len is None:
        prompt_len = s.seq if s.phase == "prefill" else s.seq - steps
        cache = s.seq + steps if s.phase == "prefill" else s.seq
    else:
        cache = max(prompt_len + steps, s.seq if s.phase == "decode" else 0)
    if prompt_len < 1:
        raise SpecError(f"a decode cache of {s.seq} positions leaves no room for a prompt before {steps} steps",
                        hint="raise serve.seq or lower --steps")
    return BuildConfig(s.batch, prompt_len, cache, ("prefill", "decode"), WEIGHT_DTYPES[s.weights])


def check_supported(spec: Spec) -> None:
    """Serve settings that parse but whose passes are not in this build fail loudly here."""
    s = spec.serve  # ffn/attn = auto are resolved by the cost model in default_pipeline
    if s.weights == "int8":
        raise SpecError("weights = int8 needs the quantize-int8 pass, which this build does not have yet",
                        hint="use --weights f32 or bf16")
    if s.overlap != "none":
        raise SpecError(f"overlap = {s.overlap} needs the collective-einsum pass, which this build does not have yet",
                        hint="use --overlap none")


def default_pipeline(spec: Spec | None) -> str:
    """The pipeline `einshard compile` and `run` use when --passes is not given.

    One device: just cleanup. A mesh: pad the heads when they do not divide over all devices
    (as the paper pads PaLM 540B from 48 to 64), apply the spec's layouts, expand the reshards
    into collectives, clean up.
    """
    if spec is None or spec.mesh.n_devices == 1:
        return "cleanup"
    check_supported(spec)
    if spec.serve.ffn == "auto" or spec.serve.attn == "auto":
        from compiler.cost.autolayout import resolve_auto

        spec = resolve_auto(spec)[0]  # the cost model's choice (see compiler/cost/autolayout.py)
    n = spec.mesh.n_devices
    parts = []
    if spec.model.attention != "grouped" and spec.model.heads % n:
        parts.append(f"pad-heads{{multiple={n}}}")
    kv = "" if spec.serve.kv == "shard" else f",kv={spec.serve.kv}"
    parts += [f"shard{{ffn={spec.serve.ffn},attn={spec.serve.attn}{kv}}}", "insert-collectives", "cleanup"]
    return ",".join(parts)


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
