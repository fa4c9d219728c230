"""Param kinds are data: a weight says whether it is a bias, a norm scale or an int8 scale, and
the rules that treat those differently read the kind, never the name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.build import WEIGHT_KINDS, BuildConfig, build_module, global_weights, layer_weights
from compiler.spec import load_spec
from ir.errors import ParseError
from ir.module import KINDS, Param
from ir.parser import parse_module
from ir.printer import print_module
from ir.types import Dim, TensorType
from passes.layouts import HeadSplit, Layout, weight_axes
from runtime.weights import random_weights

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HD = TensorType("f32", (Dim("H", 4), Dim("D", 8)))
TEXT = """module @m mesh<x=2> {
  entry func @f(
      weight bias %q_offset: f32[H=4, D=8],
      weight norm %gain: f32[E=8],
      weight scale %wq_scale: f32[H=4, D=8],
      weight %bmat: f32[E=8, F=4],
      weight %plain: f32[E=8]
  ) -> (f32[E=8]) {
    return %gain
  }
}
"""


def test_kinds_print_and_parse_back() -> None:
    m = parse_module(TEXT)
    kinds = {p.name: p.kind for p in m.functions[0].params}
    assert kinds == {"q_offset": "bias", "gain": "norm", "wq_scale": "scale", "bmat": "", "plain": ""}
    assert print_module(m) == TEXT


def test_unknown_kind_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_module(TEXT.replace("weight bias %q_offset", "weight offset %q_offset"))
    with pytest.raises(ValueError, match="unknown param kind"):
        Param("x", HD, "weight", "offset")
    assert set(KINDS) == {"", "bias", "norm", "scale"}


def test_layouts_replicate_by_kind_not_by_name() -> None:
    layout = Layout("1d-ws", "heads", (("x", 2),))
    assert weight_axes(layout, "q_offset", HD, HeadSplit(), "bias") == {}  # a bias, whatever its name
    assert weight_axes(layout, "bq", HD, HeadSplit(), "") == {"H": ("x",)}  # a name starting with b is no bias
    assert weight_axes(layout, "wq_scale", HD, HeadSplit(), "scale") == {"H": ("x",)}  # follows its weight


def test_random_weights_start_norm_scales_near_one_by_kind() -> None:
    w = random_weights(parse_module(TEXT).functions[0], seed=3)
    assert abs(w["gain"].mean() - 1.0) < 0.3  # norm: 1 + 0.1 N(0, 1)
    assert abs(w["plain"].mean()) < 0.3 and np.abs(w["q_offset"]).max() < 1.0  # biases: 0.1 N(0, 1)


def test_the_builder_gives_every_bias_and_norm_scale_a_kind() -> None:
    spec = load_spec(EXAMPLES / "tiny-mha.model")  # layernorm and every bias
    m = build_module(spec.model, BuildConfig(2, 4, 4, ("prefill",)), spec.mesh.axes)
    names = {**layer_weights(spec.model), **global_weights(spec.model)}
    assert {n for n in names if WEIGHT_KINDS.get(n)} >= {"ln1_scale", "ln1_bias", "bq", "b_in", "final_scale"}
    for fn in m.functions:
        for p in fn.params:
            if p.name in names:
                assert p.kind == WEIGHT_KINDS.get(p.name, ""), (fn.name, p)
