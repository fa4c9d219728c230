"""int8 weights (passes/quantize_int8.py, ir/quant_ops.py, runtime/kernels_rewrites.py).

* The round trip dequantize(quantize(w)) is within scale/2 of w per element (scale = the
  per-output-channel max |w| over the contracted dims / 127), on the numpy reference kernels,
  for plain and segmented (packed contraction) scales, where every segment gets its own scale.
* Quantizing before or after sharding gives the same program up to SSA value names, for every
  layout on tiny-mqa.
* The compiled JAX decode entry holds exactly the bytes the IR param types promise: int8 weights
  are half the bytes of the bf16 ones, plus their f32 scales (memory_analysis).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from conftest import EXAMPLES
from ir.parser import parse_module
from ir.printer import print_module
from partition_helpers import ATTN_LAYOUTS, FFN_LAYOUTS
from rewrite_helpers import canonical
from runtime.reference import run_reference

# |w - q*s| = s*|w/s - round(w/s)| <= s/2 exactly; the float64 division and product each add at
# most one rounding of relative size 2^-53 on values of size <= 127*s, i.e. 127*s*2^-52 ~ 3e-14*s.
ROUNDING = 127 * 2.0 ** -52


def _round_trip_module(R: int, C: int, segments: tuple[int, ...] = (), groups: int = 1):
    """w[R, C] quantized over R (the contracted dim), with segments of R when given."""
    st_ = f"S={len(segments)}, C={C}" if segments else f"C={C}"
    seg = ", ".join(map(str, segments))
    text = f"""module @m {{
  entry func @f(
      %w: f32[R={R}, C={C}]
  ) -> (i8[R={R}, C={C}], f32[{st_}], f32[R={R}, C={C}]) {{
    %q, %s = quantize(%w) {{reduce = "R", segments = [{seg}], groups = {groups}}} : i8[R={R}, C={C}], f32[{st_}]
    %d = dequantize(%q, %s) {{reduce = "R", segments = [{seg}], groups = {groups}, dtype = "f32"}} : f32[R={R}, C={C}]
    return %q, %s, %d
  }}
}}
"""
    return parse_module(text)


def _want_scale(amax):
    """max |w| / 127 per channel; an all-zero channel gets scale 1 (its q is 0 either way)."""
    return np.where(amax == 0, 1.0, amax / 127.0)


def _check_bound(w, q, s_rows, d):
    assert np.all(np.abs(q) <= 127) and np.array_equal(q, np.round(q))
    assert np.all(np.abs(d - w) <= s_rows / 2 * (1 + ROUNDING) + 1e-300)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)


@settings(max_examples=60)
@given(st.integers(1, 12), st.integers(1, 6), st.data())
def test_round_trip_within_half_a_scale(R, C, data):
    w = np.array(data.draw(st.lists(finite, min_size=R * C, max_size=R * C)), np.float64).reshape(R, C)
    q, s, d = run_reference(_round_trip_module(R, C), "f", {"w": w})
    want = _want_scale(np.abs(w).max(axis=0))
    np.testing.assert_allclose(s, want, rtol=1e-6)  # scales are f32 values: one f32 rounding
    _check_bound(w, np.asarray(q, np.float64), np.asarray(s)[None, :], d)


@settings(max_examples=60)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=3), st.sampled_from([1, 2, 4]), st.integers(1, 4),
       st.data())
def test_segmented_scales_one_per_segment(units, groups, C, data):
    """A packed contraction dim of segments interleaved in ``groups`` chunks (ir/fusion_ops.py):
    each segment's scale is the max over its own rows only; magnitudes differ by segment."""
    segments = tuple(u * groups for u in units)
    R = sum(segments)
    mags = data.draw(st.lists(st.sampled_from([1e-3, 1.0, 1e3]), min_size=len(segments), max_size=len(segments)))
    w = np.array(data.draw(st.lists(st.floats(-1, 1, allow_nan=False, allow_subnormal=False),
                                    min_size=R * C, max_size=R * C)), np.float64).reshape(R, C)
    # row -> segment: group g holds segment i's chunk of segments[i] // groups rows, in order
    seg_of = np.array([i for _ in range(groups) for i, s in enumerate(segments) for _ in range(s // groups)])
    w = w * np.array(mags)[seg_of][:, None]
    q, s, d = run_reference(_round_trip_module(R, C, segments, groups), "f", {"w": w})
    assert s.shape == (len(segments), C)
    for i in range(len(segments)):
        np.testing.assert_allclose(s[i], _want_scale(np.abs(w[seg_of == i]).max(axis=0)), rtol=1e-6)
    _check_bound(w, np.asarray(q, np.float64), np.asarray(s)[seg_of], d)


# ---- quantize before or after shard ------------------------------------------------------------


def _tiny(**kw):
    return apply_overrides(load_spec(EXAMPLES / "tiny-mqa.model"), **kw)


LAYOUTS = [(f, a) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("ffn,attn", LAYOUTS, ids=[f"{f}-{a}" for f, a in LAYOUTS])
def test_quantize_before_or_after_shard_same_program(ffn, attn, phase):
    spec = _tiny(ffn=ffn, attn=attn, phase=phase, weights="int8")
    before = default_pipeline(spec)
    parts = before.split(",")
    assert "quantize-int8" in parts and parts.index("quantize-int8") < parts.index("insert-collectives")
    parts.remove("quantize-int8")
    parts.insert(parts.index("insert-collectives") + 1, "quantize-int8")
    after = ",".join(parts)
    module = build_for(spec, compile_config(spec))
    a = print_module(compile_module(module, before).module)
    b = print_module(compile_module(module, after).module)
    assert "dequantize(" in a
    assert canonical(a) == canonical(b)


# ---- memory: int8 vs bf16 weights on 8 devices ------------------------------------------------


@lru_cache(maxsize=None)
def _compiled_decode(weights: str):
    from runtime.generate import prepared_weights, zero_caches
    from runtime.lower_jax import JaxExecutor
    from runtime.weights import random_weights

    spec = _tiny(phase="decode", weights=weights)
    raw = build_for(spec, compile_config(spec))
    m = compile_module(raw, default_pipeline(spec)).module
    ex = JaxExecutor(m)
    fn = m.function("decode")
    B = spec.serve.batch
    args = {**prepared_weights(ex, random_weights(raw.function("decode"), 0)), **zero_caches(m, "decode"),
            "tokens": np.zeros((B, 1), np.int32), "pos": np.zeros((B, 1), np.int32)}
    ma = ex.entries["decode"].lower(ex.prepare("decode", args)).compile().memory_analysis()
    return m, fn, ma


def test_memory_int8_weights_halve_plus_scales():
    m8, f8, ma8 = _compiled_decode("int8")
    m16, f16, ma16 = _compiled_decode("bf16")
    mesh = m8.mesh_sizes
    assert m8.n_devices == 8
    local8 = {p.name: p.type.local_nbytes(mesh) for p in f8.params}
    local16 = {p.name: p.type.local_nbytes(mesh) for p in f16.params}
    # the compiled programs take exactly the local blocks of their params
    assert ma8.argument_size_in_bytes == sum(local8.values())
    assert ma16.argument_size_in_bytes == sum(local16.values())
    quantized = [p.name for p in f8.params if p.type.dtype == "i8"]
    scales = [f"{w}_scale" for w in quantized]
    assert quantized and all(local8[s] > 0 for s in scales)
    for w in quantized:
        assert f16.param(w).type.dtype == "bf16"
        assert local8[w] * 2 == local16[w], f"{w}: int8 block is not half the bf16 block"
    # everything else (float weights kept, caches, tokens) is the same
    rest = set(local8) - set(quantized) - set(scales)
    assert rest == set(local16) - set(quantized)
    assert all(local8[n] == local16[n] for n in rest)
    w8 = sum(local8[w] for w in quantized)
    assert ma16.argument_size_in_bytes - ma8.argument_size_in_bytes == w8 - sum(local8[s] for s in scales)
    # and the saving is real: the quantized weights dominate the scales
    assert sum(local8[s] for s in scales) < w8 // 4
