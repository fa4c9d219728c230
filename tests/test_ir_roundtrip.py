"""Print -> parse -> print is a fixed point, and parse(print(m)) == m.

Checked on the builder's output for every example spec (each phase alone and the two-entry
program `einshard run` builds) and on random modules: hypothesis draws a mesh, named dims with
sizes and shardings that fit it, typed parameters (some partial sums), then a random chain of
unary / scale / cast / binary / einsum ops emitted through ``FunctionBuilder`` (ops whose
inference rule refuses the operands are skipped, so every module is well typed), sometimes a
layer body applied by ``scan``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ir.errors import ParseError
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.driver import build_for, compile_config, compile_module, default_pipeline, run_config
from compiler.spec import apply_overrides, load_spec
from ir.builder import BuildContext, FunctionBuilder
from ir.errors import VerifyError
from ir.module import Module
from ir.ops import BINARY_FNS, UNARY_FNS, Binary, Cast, Einsum, Scale, Scan, Symbol, Unary
from ir.parser import parse_module
from ir.printer import print_module
from ir.types import Dim, TensorType
from ir.verifier import verify

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.model"))


def assert_roundtrip(m: Module) -> str:
    """The printed text re-parses to an equal module and prints identically; returns it."""
    text = print_module(m)
    again = parse_module(text)
    assert print_module(again) == text
    assert again == m
    return text


# ---- the builder's output ------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_builder_output_roundtrips(example: Path, phase: str) -> None:
    # IR size does not depend on the model's sizes, so even the 540B models are cheap here.
    spec = apply_overrides(load_spec(example), phase=phase)
    m = build_for(spec, compile_config(spec))
    verify(m)
    text = assert_roundtrip(m)
    assert f"entry func @{phase}(" in text
    assert f"func @{phase}_layer(" in text


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_compiled_output_roundtrips(example: Path, phase: str) -> None:
    """After the default pipeline: sharded types, partial sums and collective ops round-trip."""
    spec = apply_overrides(load_spec(example), phase=phase)
    m = compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec)).module
    assert_roundtrip(m)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_two_entry_program_roundtrips(example: Path) -> None:
    spec = apply_overrides(load_spec(example), sets=["model.layers=2"])
    m = build_for(spec, run_config(spec, steps=2))
    verify(m)
    assert_roundtrip(m)
    assert [f.name for f in m.entries] == ["prefill", "decode"]


def test_parsed_ops_carry_locations_but_compare_equal() -> None:
    spec = load_spec(EXAMPLES[-1])
    m = build_for(spec, compile_config(spec))
    parsed = parse_module(print_module(m), "x.ir")
    op = parsed.functions[0].ops[0]
    assert op.loc is not None and op.loc.file == "x.ir"
    assert m.functions[0].ops[0].loc is None
    assert parsed == m


# ---- random modules ------------------------------------------------------------------------

AXES = ("x", "y", "z", "w")
LETTERS = "ABCDEFGHIJKLMOPQRSTUVWXYZ"  # no N: scan stacks along N
FLOATS = ("f32", "bf16", "f16", "f64")
IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)


@st.composite
def meshes(draw) -> dict[str, int]:
    names = draw(st.lists(st.sampled_from(AXES), unique=True, max_size=3))
    return {a: draw(st.sampled_from([1, 2, 4])) for a in names}


@st.composite
def dim_tables(draw, mesh: dict[str, int]) -> dict[str, Dim]:
    """Dim letters with a size and a sharding each; every mesh axis shards at most one letter,
    so any type over these dims is legal on the mesh."""
    letters = draw(st.lists(st.sampled_from(LETTERS), unique=True, min_size=1, max_size=5))
    free = list(mesh)
    out = {}
    for c in letters:
        axes: tuple[str, ...] = ()
        if free and draw(st.booleans()):
            axes = tuple(draw(st.lists(st.sampled_from(free), unique=True, min_size=1, max_size=2)))
            free = [a for a in free if a not in axes]
        n = 1
        for a in axes:
            n *= mesh[a]
        out[c] = Dim(c, n * draw(st.integers(1, 3)), axes)
    return out


@st.composite
def tensor_types(draw, dims: dict[str, Dim], mesh: dict[str, int]) -> TensorType:
    letters = draw(st.permutations(sorted(dims)))
    chosen = tuple(dims[c] for c in letters[: draw(st.integers(0, len(letters)))])
    dtype = draw(st.sampled_from(FLOATS + ("i32",)) if draw(st.integers(0, 9)) == 0 else st.sampled_from(FLOATS))
    used = {a for d in chosen for a in d.axes}
    spare = [a for a in mesh if a not in used]
    partial = frozenset(draw(st.lists(st.sampled_from(spare), unique=True, max_size=2))) if spare and draw(
        st.integers(0, 3)) == 0 else frozenset()
    return TensorType(dtype, chosen, partial)


def _emit(draw, b: FunctionBuilder, values: list[str]) -> None:
    """Tries one random op; keeps it only if its inference rule accepts the operands."""
    kind = draw(st.sampled_from(["unary", "scale", "cast", "binary", "einsum", "einsum"]))
    pick = st.sampled_from(values)
    hint = draw(st.sampled_from(["v", "h", "x", "out", "k_cache", ""]))
    try:
        if kind == "unary":
            r = b.emit(Unary, [draw(pick)], hint, fn=draw(st.sampled_from(UNARY_FNS)))
        elif kind == "scale":
            factor = draw(st.floats(allow_nan=False, allow_infinity=False, width=64))
            r = b.emit(Scale, [draw(pick)], hint, factor=factor)
        elif kind == "cast":
            r = b.emit(Cast, [draw(pick)], hint, dtype=draw(st.sampled_from(FLOATS)))
        elif kind == "binary":
            r = b.emit(Binary, [draw(pick), draw(pick)], hint, fn=draw(st.sampled_from(BINARY_FNS)))
        else:
            ops = draw(st.lists(pick, min_size=1, max_size=2))
            terms = [b.types[o].names for o in ops]
            union = sorted(set("".join(terms)))
            out = "".join(draw(st.permutations(union))[: draw(st.integers(0, len(union)))])
            r = b.emit(Einsum, ops, hint, spec=",".join(terms) + "->" + out)
    except VerifyError:
        return
    values.append(r)


@st.composite
def random_modules(draw) -> Module:
    mesh = draw(meshes())
    dims = draw(dim_tables(mesh))
    ctx = BuildContext(mesh)
    fns = []
    with_body = draw(st.booleans())
    if with_body:
        # A layer body: a carry whose type it returns unchanged, plus per-layer extras.
        body = FunctionBuilder("body", ctx)
        carry_t = draw(tensor_types(dims, mesh))
        c = body.param("c", carry_t)
        w = body.param("w", draw(tensor_types(dims, mesh)))
        vals = [c, w]
        for _ in range(draw(st.integers(0, 4))):
            _emit(draw, body, vals)
        body_fn = body.finish([c, vals[-1]])
        ctx.add(body_fn)
        fns.append(body_fn)
    b = FunctionBuilder(draw(st.sampled_from(["main", "prefill", "decode", "f_1"])), ctx, entry=draw(st.booleans()))
    values = []
    for i in range(draw(st.integers(1, 4))):
        name = draw(IDENT.filter(lambda s, vs=tuple(values): s not in (*vs, "c0", "ws")))
        values.append(b.param(name, draw(tensor_types(dims, mesh)), draw(st.sampled_from(["arg", "input", "weight", "cache"]))))
    if with_body:
        n = draw(st.integers(1, 3))
        c0 = b.param("c0", body_fn.params[0].type)
        ws = b.param("ws", TensorType(body_fn.params[1].type.dtype, (Dim("N", n), *body_fn.params[1].type.dims),
                                      body_fn.params[1].type.partial), "weight")
        try:
            values += list(b.emit(Scan, [c0, ws], ["c", "ys"], body=Symbol("body"), carry=1, consts=0))
        except VerifyError:
            pass
    for _ in range(draw(st.integers(0, 8))):
        _emit(draw, b, values)
    returns = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3))
    fns.append(b.finish(returns))
    name = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,8}", fullmatch=True))
    return Module(name, tuple(mesh.items()), tuple(reversed(fns)) if draw(st.booleans()) else tuple(fns))


@given(random_modules())
def test_random_modules_roundtrip(m: Module) -> None:
    verify(m)  # the builder only emits well-typed ops
    assert_roundtrip(m)


@settings(max_examples=30)
@given(random_modules(), st.text(max_size=12), st.floats(allow_nan=False, allow_infinity=False))
def test_attribute_values_roundtrip(m: Module, s: str, f: float) -> None:
    """Any string (quotes, backslashes, control characters, non-ASCII) and any finite float
    survive printing and parsing, whether or not the op would verify."""
    fn = m.functions[-1]
    x = fn.params[0].name
    extra = (Unary(results=("u",), operands=(x,), types=(fn.params[0].type,), fn=s),
             Scale(results=("s",), operands=(x,), types=(fn.params[0].type,), factor=f))
    m2 = m.with_function(fn.with_ops(fn.ops + extra))
    text = assert_roundtrip(m2)
    assert f"fn = {json.dumps(s)}" in text


def test_float_attributes_keep_their_spelling() -> None:
    text = """module @m {
  func @f(
      %x: f32[A=2]
  ) -> (f32[A=2]) {
    %a = scale(%x) {factor = 1e-05} : f32[A=2]
    %b = scale(%a) {factor = 1e+16} : f32[A=2]
    %c = scale(%b) {factor = -0.0} : f32[A=2]
    %d = scale(%c) {factor = 5e-324} : f32[A=2]
    return %d
  }
}
"""
    assert print_module(parse_module(text)) == text


def test_integer_spelled_float_attribute_prints_as_float() -> None:
    """``factor = 2`` is accepted for a float attribute and prints canonically as ``2.0``."""
    text = "module @m { func @f(%x: f32[A=2]) -> (f32[A=2]) { %y = scale(%x) {factor = 2} : f32[A=2] return %y } }"
    m = parse_module(text)
    assert m.functions[0].ops[0].factor == 2.0
    assert "{factor = 2.0}" in assert_roundtrip(m)


def test_non_finite_float_attribute_is_a_parse_error() -> None:
    """A float literal too large for a double would be inf, which has no text form: refused."""
    text = "module @m { func @f(%x: f32[A=2]) -> (f32[A=2]) { %y = scale(%x) {factor = 1e999} : f32[A=2] return %y } }"
    with pytest.raises(ParseError, match="not finite"):
        parse_module(text)
