"""Hypothesis properties of the cost model over random models, meshes and layouts:

* more chips never increase the compute or weight-load time per chip (doubling one mesh axis);
* int8 weights (1 byte) halve the weight bytes per chip of bf16 weights;
* batch-sharded KV-cache bytes per chip = total / devices;
* the step time sits between its bounds: max(compute, memory) + exposed comm <= time <= the sum.
"""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from compiler.cost.hardware import CHIPS
from compiler.cost.model import memory_per_chip, price
from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec
from ir.module import Param

V4 = CHIPS["tpu-v4"]


@st.composite
def configs(draw):
    d_model = draw(st.sampled_from([64, 128, 256]))
    heads = draw(st.sampled_from([4, 8, 16]))
    mha = draw(st.booleans())
    model = ModelSpec("p", layers=draw(st.integers(1, 4)), d_model=d_model, heads=heads,
                      kv_heads=heads if mha else 1, d_head=draw(st.sampled_from([16, 32])),
                      d_ff=d_model * draw(st.sampled_from([2, 4])), vocab=draw(st.sampled_from([256, 1000])),
                      block=draw(st.sampled_from(["parallel", "serial"])), mlp=draw(st.sampled_from(["swiglu", "gelu"])))
    n_axes = draw(st.integers(1, 3))
    sizes = [draw(st.sampled_from([1, 2])) for _ in range(n_axes)]  # up to 16 devices once doubled
    mesh = tuple(zip("xyz", sizes))
    grow = draw(st.integers(0, n_axes - 1))
    ffn = draw(st.sampled_from(["1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz"]))
    attn = draw(st.sampled_from(["heads", "batch"]))
    phase = draw(st.sampled_from(["prefill", "decode"]))
    return model, mesh, grow, ffn, attn, phase


def compiled(model, mesh, ffn, attn, phase, batch=64, seq=32, weights="bf16"):
    spec = Spec(model, MeshSpec(mesh), ServeSpec(phase=phase, batch=batch, seq=seq, ffn=ffn, attn=attn,
                                                 weights=weights, hardware="tpu-v4"))
    m0 = build_for(spec, compile_config(spec))
    return compile_module(m0, default_pipeline(spec)).module


# Heads are made to divide the bigger mesh: where they do not, pad-heads pads them to a multiple
# of the devices even when the layout does not shard heads over all of them (wg-x on one axis
# keeps them whole), so the bigger mesh's *program* has more attention work, and the model
# rightly prices it (e.g. heads 4 on x=4 -> x=8 under wg-x: 2x the attention FLOPs). Likewise a
# vocabulary that stops dividing keeps the embedding whole on every chip (vocab 1000 on 8 -> 16
# devices: 8x the logits FLOPs per chip), so the vocabulary is a power of two here.
@given(configs(), st.integers(1, 2))
def test_more_chips_never_increase_compute_or_weight_load(cfg, k):
    model, mesh, grow, ffn, attn, phase = cfg
    bigger = tuple((a, s * 2 if i == grow else s) for i, (a, s) in enumerate(mesh))
    heads = k * math.prod(s for _, s in bigger)
    model = replace(model, heads=heads, kv_heads=heads if model.kv_heads > 1 else 1, vocab=256)
    small = price(compiled(model, mesh, ffn, attn, phase), V4)
    big = price(compiled(model, bigger, ffn, attn, phase), V4)
    assert big.per_step.compute <= small.per_step.compute * (1 + 1e-12)
    assert big.per_step.weights <= small.per_step.weights * (1 + 1e-12)
    assert big.memory.weights <= small.memory.weights


@given(configs())
def test_int8_halves_weight_bytes(cfg):
    """Weight bytes per chip are read off the entry's weight params: i8 params (what quantize-int8
    leaves for the layer weights) cost half of bf16 ones, element for element."""
    model, mesh, _, ffn, attn, phase = cfg
    m = compiled(model, mesh, ffn, attn, phase)
    entry = m.entries[0]
    i8 = entry.__class__(entry.name, tuple(Param(p.name, p.type.with_dtype("i8"), p.role) if p.role == "weight"
                                           else p for p in entry.params),
                         entry.ops, entry.returns, entry.result_types, entry.entry)
    as_int8 = memory_per_chip(m.with_function(i8))
    as_bf16 = memory_per_chip(m)
    assert 2 * as_int8.weights == as_bf16.weights
    assert as_int8.kv == as_bf16.kv


@given(configs(), st.sampled_from([64, 128]))
def test_batch_sharded_kv_bytes_are_total_over_devices(cfg, batch):
    model, mesh, _, ffn, _, phase = cfg
    m = compiled(replace(model, kv_heads=1), mesh, ffn, "batch", phase, batch=batch)
    n = math.prod(s for _, s in mesh)
    total = 2 * model.layers * batch * 32 * 1 * model.d_head * 2
    assert memory_per_chip(m).kv * n == total


@given(configs())
def test_step_time_between_its_bounds(cfg):
    model, mesh, _, ffn, attn, phase = cfg
    e = price(compiled(model, mesh, ffn, attn, phase), V4)
    c = e.per_step
    lo = max(c.compute, c.memory) + c.comm_exposed
    hi = c.compute + c.memory + c.comm_exposed + c.overhead
    assert lo * (1 - 1e-12) <= e.step_time_s <= hi * (1 + 1e-12)
    assert 0 < e.mfu < 1


def compiled_overlap(model, mesh, ffn, attn, phase, overlap):
    spec = Spec(model, MeshSpec(mesh), ServeSpec(phase=phase, batch=64, seq=32, ffn=ffn, attn=attn, weights="bf16",
                                                 overlap=overlap, hardware="tpu-v4"))
    m0 = build_for(spec, compile_config(spec))
    return compile_module(m0, default_pipeline(spec)).module


@given(configs(), st.sampled_from(["none", "looped", "bidirectional"]))
def test_calibrated_is_never_below_the_bound_and_both_stay_between_their_sums(cfg, overlap):
    """Efficiencies are at most 1 and latencies at least 0, so the calibrated step is never faster
    than the bound; under every overlap each stays between max(compute, memory) + exposed comm
    and the plain sum of its components; more overlap is never slower."""
    from compiler.cost.efficiency import efficiency_for

    model, mesh, _, ffn, attn, phase = cfg
    m = compiled_overlap(model, mesh, ffn, attn, phase, overlap)
    bound = price(m, V4, overlap=overlap)
    cal = price(m, V4, eff=efficiency_for("tpu-v4"), overlap=overlap)
    assert cal.step_time_s >= bound.step_time_s * (1 - 1e-12)
    for e in (bound, cal):
        c = e.per_step
        assert (max(c.compute, c.memory) + c.comm_exposed) * (1 - 1e-12) <= e.step_time_s
        assert e.step_time_s <= (c.compute + c.memory + c.comm_exposed + c.overhead) * (1 + 1e-12)
    if overlap != "none":
        plain = price(m, V4, overlap="none")  # the same program with nothing run ahead
        assert bound.step_time_s <= plain.step_time_s * (1 + 1e-12)
