"""Projection weights stored ``[out, in]`` on device (runtime/projections.py).

* Which einsums are projections, and which weights the runner stores transposed (every weight
  read only by projections as ``CQ``; the output dims first, a stacked layer dim kept first).
* Storing them transposed changes nothing a user sees: the same greedy tokens as the IR's
  ``[in, out]`` layout for f32 (both equal to transformers'), bf16 and int8, at batch 1 and 3
  with prompts of different lengths, and int8 on a 2 x 2 mesh (weights sharded over both axes)
  equals int8 on one device.
* The point of it: in the optimized HLO of the int8 decode step no dequantized weight exists
  (no float array the size of an int8 weight outside a fused dot), where the ``[in, out]``
  layout converts whole weights to float in memory.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compiler.generation import make_runner
from compiler.spec import apply_overrides
from gen_helpers import PROMPTS, Tiny, tiny
from runtime.generator import GenerateRequest, Generator
from runtime.lower_jax import JaxBackend
from runtime.projections import projection_letters
from runtime.sampling import SamplingParams

NEW = 8


@pytest.mark.parametrize("spec,want", [
    ("BLE,EKGD->BLKGD", (1, False)), ("BLKGD,KGDE->BLE", (3, False)), ("BLF,FE->BLE", (1, False)),
    ("BLE,VE->BLV", (1, True)), ("BLE,EV->BLV", (1, False)),
    ("BKGLT,BTKD->BLKGD", None), ("BLE,EF->BF", None), ("BLE,BE->BL", None), ("AB,CD->ABCD", None),
])
def test_projection_letters(spec, want) -> None:
    assert projection_letters(spec) == want


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("out_in")
    return {w: tiny("llama", root / w, weights=w) for w in ("f32", "bf16", "int8")}


def _runner(m: Tiny, out_in: bool, **over: str):
    r = make_runner(apply_overrides(m.spec, **over) if over else m.spec, m.weights, 64, batch=len(PROMPTS))
    r.out_in = out_in
    return r


def test_projection_weights_are_stored_out_in(models) -> None:
    r = models["int8"].gen.runner
    r.step("decode", 1, 1, 64)
    # per-layer lists: perms over one layer's dims; the head is [V, E] already (read as QC)
    assert r.layouts == {"wq": (1, 2, 3, 0), "wk": (1, 2, 0), "wv": (1, 2, 0), "wo": (3, 0, 1, 2),
                         "w_gate": (1, 0), "w_up": (1, 0), "w_down": (1, 0)}
    assert r.params["lm_head"].shape == (96, 32)
    assert r.params["wq"][0].shape == (2, 2, 8, 32) and r.params["wq"][0].dtype == jnp.int8  # K, G, D, E
    # E, (K, G, D): an int8 weight contracting several dims is stored flat (projections.flat_stored)
    assert r.params["wo"][0].shape == (32, 32)
    assert r.params["wq_scale"][0].shape == (2, 2, 8)  # scales keep their dims
    f32 = models["f32"].gen.runner
    f32.step("decode", 1, 1, 64)
    assert f32.params["wo"][0].shape == (32, 2, 2, 8)  # the f32 library dot reads any shape as 2-D
    off = _runner(models["int8"], False)
    off.step("decode", 1, 1, 64)
    assert off.layouts == {} and off.params["wq"][0].shape == (32, 2, 2, 8)


@pytest.mark.parametrize("weights", ["f32", "bf16"])
def test_same_tokens_as_the_in_out_layout(models, weights) -> None:
    m = models[weights]
    req = GenerateRequest.of(PROMPTS, SamplingParams(), NEW)
    on = m.gen.generate(req).tokens
    off = Generator(_runner(m, False)).generate(req).tokens
    assert on == off
    assert len({t for row in on for t in row}) > 4  # not a degenerate continuation
    if weights == "f32":
        assert on == [m.want(p, NEW) for p in PROMPTS]


def _prefill_logits(r) -> np.ndarray:
    tokens = np.array([PROMPTS[0]], np.int32)
    pos = np.arange(tokens.shape[1], dtype=np.int32)[None]
    L = tokens.shape[1]
    logits, _ = jax.jit(r.step("prefill", 1, L, 64))(r.params, tokens, pos, r.empty_cache(1, 64))
    return np.asarray(logits, np.float64)


def test_int8_logits_as_the_in_out_layout(models) -> None:
    """Stored [out, in], an int8 projection (weights only: int8_activations off) multiplies q
    in f32 and scales the product, where the [in, out] path rounds q * scale to the program's
    bf16 first: the two differ by bf16 roundings (8 mantissa bits, ~4e-3 relative, through 2
    layers), so the logits are compared at that precision (greedy tokens of a random tiny model
    diverge after a few steps)."""
    m = models["int8"]
    weights_only = _runner(m, True)
    weights_only.backend = JaxBackend(int8_activations=False)
    on, off = _prefill_logits(weights_only), _prefill_logits(_runner(m, False))
    assert np.abs(on - off).max() <= 2e-2 * np.abs(off).max()
    assert on.argmax() == off.argmax()


def test_int8_on_a_mesh_equals_one_device(models) -> None:
    """Compared with int8 weights only: int8_dot's per-row activation rounding turns the bf16
    rounding differences of the mesh's partial sums into whole int8 steps, and this random tiny
    model's tokens then diverge (its sharded int8_dot itself equals one device's:
    tests/test_int8_dot.py)."""
    m = models["int8"]
    req = GenerateRequest.of(PROMPTS[1:], SamplingParams(), NEW)
    r = _runner(m, True, mesh="x=2,y=2", ffn="2d-ws", attn="heads")
    r.backend = JaxBackend(mesh={"x": 2, "y": 2}, int8_activations=False)
    one = _runner(m, True)
    one.backend = JaxBackend(int8_activations=False)
    got = Generator(r).generate(req).tokens
    assert r.layouts and any(d.axes for p in r._get("decode", 2, 1, 64).fn.params if p.name == "w_up"
                             for d in p.type.dims)  # the stored weight really is sharded
    assert got == Generator(one).generate(req).tokens


def _entry_float_shapes(r) -> set[tuple[int, ...]]:
    """Shapes of the float arrays the int8 decode step's ENTRY computation materializes."""
    step = r.step("decode", 1, 1, 64)
    tok = jnp.zeros((1, 1), jnp.int32)
    hlo = jax.jit(step).lower(r.params, tok, tok, r.empty_cache(1, 64)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"= (?:f32|bf16)\[([\d,]+)\]", entry)}


def _loop_float_shapes(g: Generator) -> set[tuple[int, ...]]:
    """Shapes of the float arrays the on-device decode loop makes outside its while loop."""
    req = GenerateRequest.of(PROMPTS[:1], SamplingParams(), NEW)
    g.compile(req)
    hlo = next(c for k, c in g._compiled.items() if k[0] == "loop").as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"= (?:f32|bf16)\[([\d,]+)\]", entry)}


def test_no_dequantized_weight_is_materialized(models) -> None:
    m = models["int8"]
    r = m.gen.runner
    r.step("decode", 1, 1, 64)
    shapes = set()  # every int8 weight's shape as stored, logical, and flattened to 2-D either way
    types = {p.name: p.type for p in r._get("decode", 1, 1, 64).fn.params}
    for name, perm in r.layouts.items():
        logical = tuple(types[name].shape[1:])  # per layer
        stored = tuple(logical[i] for i in perm)
        n_in = len(stored) - perm.index(0)  # the contracted dims trail the stored shape
        q, c = int(np.prod(stored[: len(stored) - n_in])), int(np.prod(stored[len(stored) - n_in:]))
        shapes |= {stored, logical, (q, c), (c, q)}
    assert len(shapes) >= 4
    assert _entry_float_shapes(r) & shapes == set()
    # nor in the on-device loop: its converts are not hoisted out of the while (runtime/generator.py)
    assert _loop_float_shapes(m.gen) & shapes == set()
    # the IR's [in, out] layout: XLA converts int8 weights to float before the dots
    assert _entry_float_shapes(_runner(m, False)) & shapes
