"""Programs and pipelines for specs whose settings are all decided (no ``auto``).

The serve settings turn into program shapes (BuildConfig) and into the default pipeline here.
The cost model (compiler/cost/autolayout.py) compiles its candidates with these functions, and
compiler/driver.py resolves ``auto`` settings with the cost model before calling them, so every
import points one way: driver -> cost -> pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from compiler.build import BuildConfig, build_module
from compiler.spec import Spec
from compiler.stages import inner_mesh, inner_spec, stage_pass
from ir.errors import LayoutError, SpecError
from ir.module import Module
from passes.layouts import Layout, padded_heads
from passes.manager import Instrumentation, PassManager, PipelineRun
from passes.pipeline import Pipeline, format_pass, parse_pipeline

#: The float type of the program per weight format; int8 weights are quantized from bf16 by
#: quantize-int8 and dequantized to bf16 before each matmul.
WEIGHT_DTYPES = {"f32": "f32", "bf16": "bf16", "int8": "bf16"}


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


def settle_kv(spec: Spec) -> Spec:
    """``kv = auto`` where there is nothing to choose (one device, or not grouped-query): shard."""
    if spec.serve.kv == "auto" and (spec.mesh.n_devices == 1 or spec.model.attention != "grouped"):
        return replace(spec, serve=replace(spec.serve, kv="shard"))
    return spec


def concrete(spec: Spec) -> Spec:
    """``spec`` with every setting decided; ``auto`` ones that still need the cost model are a
    ValueError (an internal mistake: compiler/driver.py ``resolved`` decides them first)."""
    spec = settle_kv(spec)
    s = spec.serve
    if s.kv == "auto" or (spec.mesh.n_devices > 1 and "auto" in (s.ffn, s.attn)):
        raise ValueError(f"resolve the auto settings first (ffn={s.ffn}, attn={s.attn}, kv={s.kv})")
    return spec


def default_pipeline(spec: Spec | None, rewrites: bool = True, pad_batch: bool = True) -> str:
    """The pipeline `einshard compile` and `run` use when --passes is not given, for a spec
    without ``auto`` settings (compiler/driver.py ``default_pipeline`` resolves them first).

    For the spec's phase (the cost model resolves ``auto`` layouts and ``kv = auto`` per phase):
    pad what does not divide the devices that shard it (:func:`pad_options`: the heads to a
    multiple of :func:`head_multiple`, grouped-query K x G as passes/layouts.py
    ``padded_heads`` says under ``kv = pad``, the vocabulary to the device count), fuse a
    parallel block's projections, quantize the weights for ``weights = int8``, apply the
    layouts, expand the reshards into collectives, clean up, and for ``overlap = looped |
    bidirectional`` turn collective + einsum pairs into ring loops. One device: fusion,
    quantization and cleanup only. ``rewrites=False`` leaves out fusion, int8 and loops: the
    paper's layouts alone (the layout tests and docs/layouts.md use it). d_ff, d_model and the
    batch are padded by pad-dims (:func:`dim_pad_options`); ``pad_batch=False`` leaves the batch
    to a caller that chooses batches itself (the generation runner and the serving engine).
    """
    if spec is None:
        return "cleanup"
    if stage_pass(spec):  # the layouts inside a stage, then the stages (compiler/stages.py)
        return ",".join((default_pipeline(inner_spec(spec), rewrites, pad_batch), stage_pass(spec)))
    spec = concrete(spec)
    m, s, n = spec.model, spec.serve, spec.mesh.n_devices
    parts = []
    pad = pad_options(spec)
    if pad:
        parts.append("pad-heads{" + ",".join(f"{k}={v}" for k, v in pad.items()) + "}")
    dims = dim_pad_options(spec, pad_batch)
    if dims:
        parts.append("pad-dims{" + ",".join(f"{k}={v}" for k, v in dims.items()) + "}")
    if rewrites and m.block == "parallel":
        parts.append("fuse-parallel-block" if fuse_attention(spec) else "fuse-parallel-block{attention=false}")
    if rewrites and s.weights == "int8":
        parts.append("quantize-int8")
    if n > 1:
        kv = ",kv=replicate" if s.kv == "replicate" and m.attention == "grouped" else ""
        ex = f",experts={s.expert_axes}" if m.moe else ""
        parts += [f"shard{{ffn={s.ffn},attn={s.attn}{kv}{ex}}}", "insert-collectives"]
    parts.append("cleanup")
    if rewrites and n > 1 and s.overlap != "none":
        parts.append("collective-einsum" + ("{bidirectional=true}" if s.overlap == "bidirectional" else ""))
    return ",".join(parts)


def pad_options(spec: Spec) -> dict[str, int]:
    """pad-heads options for a resolved spec (empty: nothing to pad). Heads (H) to a multiple of
    :func:`head_multiple`; grouped-query heads only under ``kv = pad``, to the smallest K' x G'
    that divides the head axes (passes/layouts.py ``padded_heads``); the vocabulary to a
    multiple of the devices, so that the embedding and the output head stay vocab-parallel."""
    m, n = spec.model, spec.mesh.n_devices
    if n == 1 or (not spec.serve.pad and spec.serve.kv != "pad"):
        return {}
    out: dict[str, int] = {}
    if m.attention != "grouped":
        mult = head_multiple(spec)
        if m.heads % mult and spec.serve.pad:  # without pad, kv = pad still pads grouped-query heads
            out["multiple"] = mult
    elif spec.serve.kv == "pad":
        k, g = padded_heads(_layout(spec), m.kv_heads, m.heads // m.kv_heads)
        if k != m.kv_heads:
            out["kv_heads"] = k
        if g != m.heads // m.kv_heads:
            out["groups"] = g
    if m.vocab % n and spec.serve.pad:
        out["vocab"] = n
    if m.qk_norm == "all" and {"multiple", "kv_heads", "groups"} & set(out):
        raise LayoutError(f"{m.heads} query heads ({m.kv_heads} K/V) do not divide the devices that shard them, and "
                          "the QK-norm over all heads (OLMoE) cannot be zero-padded: padded heads would change its "
                          "statistics", hint="choose a mesh or layout whose head axes divide the heads, or "
                          "--set serve.kv=replicate")
    if out and not {"multiple", "kv_heads", "groups"} & out.keys():
        # the vocabulary alone: a bare pad-heads would also pad the heads to the device count
        # (G of an explicit kv = shard | replicate, or H that already divides its devices)
        out = {"multiple": 1, **out}
    return out


def dim_pad_options(spec: Spec, pad_batch: bool = True) -> dict[str, int]:
    """pad-dims options for a resolved spec (empty: nothing to pad, or ``serve.pad = false``):
    d_ff to a multiple of the wide weight axes' devices, d_model to a multiple of both the
    weights' E axes and the residual stream's, the batch to a multiple of the residual stream's
    batch axes (weight-gathered layouts) and, under ``attn = batch``, far enough that the KV
    cache's first batch axis takes a part of it (weight-stationary layouts split that axis:
    passes/layouts.py ``split_for_batch``, so a factor in common suffices)."""
    m, s = spec.model, spec.serve
    if spec.mesh.n_devices == 1 or not s.pad:
        return {}
    layout = _layout(spec)
    sizes = layout.sizes

    def devices(axes: tuple[str, ...]) -> int:
        return math.prod(sizes[a] for a in axes)

    out: dict[str, int] = {}
    f = devices(layout.wide())
    if m.d_ff % f:
        out["d_ff"] = f
    e = math.lcm(devices(layout.narrow()), devices(layout.rest()["E"]))
    if m.d_model % e:
        out["d_model"] = e
    if pad_batch:
        b = batch_multiple(layout, s.batch)
        if s.batch % b:
            out["batch"] = b
    return out


def batch_multiple(layout: Layout, batch: int) -> int:
    """What the batch must be a multiple of for ``layout`` (1: any batch)."""
    sizes = layout.sizes
    mult = math.prod(sizes[a] for a in layout.batch_axes())
    if layout.attn == "batch" and not layout.weights_move:
        first = sizes[layout.prefer()["B"][0]]
        if math.gcd(batch, first) == 1 and first > 1:  # the smallest factor of the axis gives a split
            mult = math.lcm(mult, next(p for p in range(2, first + 1) if first % p == 0))
    return mult


def head_multiple(spec: Spec) -> int:
    """The device count that the default pipeline pads the query heads (H) to a multiple of.

    Padding costs weight memory and bandwidth, so it goes only as far as the layout shards the
    heads: the wide weight axes (passes/layouts.py ``Layout.wide``: all devices in 1D-WS, Z·Y
    in 2D-WS and the weight-gathered layouts), under either attention layout. Under ``attn =
    heads`` Q's partial sums over X then land on another dim (passes/shard.py ``settle``) and
    the scores einsum gathers it: an all-reduce's worth of traffic, far less than padded
    weights (PaLM 540B: 48 heads over 16 devices instead of 64 padded ones).
    The spec has no ``auto`` settings (compiler/driver.py ``head_multiple`` resolves them).
    """
    spec = concrete(spec)
    if spec.mesh.n_devices == 1:
        return 1
    return _wide_devices(spec)


def _layout(spec: Spec) -> Layout:
    return Layout(spec.serve.ffn, spec.serve.attn, spec.mesh.axes)


def _wide_devices(spec: Spec) -> int:
    """Devices of the wide weight dims (F, heads), as the layout places them."""
    layout = _layout(spec)
    return math.prod(layout.sizes[a] for a in layout.wide())


def fuse_attention(spec: Spec) -> bool:
    """Grouped-query projections join the packed weight only when their K/V heads (padded under
    ``kv = pad``) are sharded over all the head axes (else query heads are sharded inside a group,
    which a packed dim cannot express). The spec has no ``auto`` settings."""
    spec = concrete(spec)
    m, s = spec.model, spec.serve
    if m.attention != "grouped" or spec.mesh.n_devices == 1:
        return True
    if s.kv == "replicate":
        return False
    k = pad_options(spec).get("kv_heads", m.kv_heads)
    return k % _wide_devices(spec) == 0


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
    """The unsharded module, its mesh the axes inside a stage (pipeline-stages adds the stage axis);
    a mixture of experts' capacity from the spec."""
    if spec.serve.moe_capacity:
        cfg = replace(cfg, capacity_factor=spec.serve.moe_capacity)
    return build_module(spec.model, cfg, inner_mesh(spec))


def padding(spec: Spec, pad_batch: bool = True) -> tuple[str, ...]:
    """What the default pipeline zero-pads for a resolved spec, as ``dim true -> padded`` (the
    statistics pad-heads and pad-dims report): explain lists it beside the prices, which are
    those of the padded program."""
    m = spec.model
    out = []
    heads = pad_options(spec)
    if "multiple" in heads:
        out.append(f"H {m.heads} -> {-(-m.heads // heads['multiple']) * heads['multiple']}")
    if "kv_heads" in heads:
        out.append(f"K {m.kv_heads} -> {heads['kv_heads']}")
    if "groups" in heads:
        out.append(f"G {m.heads // m.kv_heads} -> {heads['groups']}")
    if "vocab" in heads:
        out.append(f"V {m.vocab} -> {-(-m.vocab // heads['vocab']) * heads['vocab']}")
    sizes = {"d_ff": ("F", m.d_ff), "d_model": ("E", m.d_model), "batch": ("B", spec.serve.batch)}
    for k, mult in dim_pad_options(spec, pad_batch).items():
        d, n = sizes[k]
        out.append(f"{d} {n} -> {-(-n // mult) * mult}")
    return tuple(out)
