"""Property tests for the spec language: no input escapes as anything but a located SpecError,
and every valid spec survives format_spec → parse_spec unchanged.

Example counts come from the active hypothesis profile (tests/conftest.py registers "ci").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import spec as S
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec, apply_overrides, format_spec, parse_spec
from ir.errors import SpecError

pytestmark = pytest.mark.fuzz  # `make fuzz` runs this file with 10,000 examples per property

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.model"))
EXAMPLE_TEXTS = [p.read_text() for p in EXAMPLES]

TOKENS = [
    "model", "mesh", "serve", "tiny", "{", "}", "=", " = ", "\n", "\r\n", " ", "\t", "# c\n",
    "layers", "heads", "kv_heads", "d_head", "rotary_dim", "norm_eps", "phase", "x", "y",
    "0", "2", "3", "-1", "2.5", "1e-5", "1e999", "true", "decode", "swiglu", "\"", ":", "\x00", "é",
]

# Fields allowed by ordinary (non-fuzz) edits, so that mutations of examples stay meaningful.
spec_chars = st.sampled_from(list("{}=#\n\r\t .-_+0123456789abexyz\"':;\x00\x0cé"))


def check(text: str, path: str = "f.model") -> Spec | None:
    """Parses ``text``; a failure must be a SpecError with a sane location and rendering."""
    try:
        return parse_spec(text, path)
    except SpecError as e:
        rendered = str(e)
        assert rendered.startswith(f"{path}:") and "spec error: " in rendered
        assert e.loc is not None and e.loc.file == path
        lines = text.split("\n")
        assert 1 <= e.loc.line <= len(lines) and e.loc.col >= 1 and e.loc.length >= 1
        if e.loc.source_line is not None:
            assert len(e.loc.source_line) == len(lines[e.loc.line - 1].rstrip("\r"))
        return None


@settings(deadline=None)
@given(st.one_of(st.text(), st.text(spec_chars), st.lists(st.sampled_from(TOKENS)).map("".join)))
def test_random_text_parses_or_raises_spec_error(text: str) -> None:
    check(text)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap", "duplicate"]))
        i = draw(st.integers(0, len(text)))
        if op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif op == "insert":
            text = text[:i] + draw(st.one_of(st.sampled_from(TOKENS), st.text(spec_chars, max_size=4))) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(spec_chars) + text[i + 1:]
        else:
            lines = text.split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "swap":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            text = "\n".join(lines)
    return text


@settings(deadline=None)
@given(mutated_example())
def test_mutated_examples_parse_or_raise_spec_error(text: str) -> None:
    spec = check(text)
    if spec is not None:
        assert parse_spec(format_spec(spec), "f.model") == spec


WORD = st.from_regex(r"[A-Za-z0-9_.+\-]{1,12}", fullmatch=True)
IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
SIZE = st.integers(1, 2**62)
SMALL = st.integers(1, 64)
POSITIVE_FLOAT = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_nan=False)


@st.composite
def model_specs(draw: st.DrawFn) -> ModelSpec:
    kv = draw(SMALL)
    d_head = draw(st.integers(1, 64).map(lambda n: 2 * n))
    return ModelSpec(
        name=draw(WORD), layers=draw(SIZE), d_model=draw(SIZE), heads=kv * draw(SMALL), kv_heads=kv,
        d_head=d_head, d_ff=draw(SIZE), vocab=draw(SIZE),
        block=draw(st.sampled_from(S.BLOCK_KINDS)), mlp=draw(st.sampled_from(S.MLP_KINDS)),
        norm=draw(st.sampled_from(S.NORM_KINDS)), norm_eps=draw(POSITIVE_FLOAT), rope_theta=draw(POSITIVE_FLOAT),
        rotary_dim=draw(st.integers(0, d_head // 2).map(lambda n: 2 * n)),
        rotary_style=draw(st.sampled_from(S.ROTARY_STYLES)), bias=draw(st.sampled_from(S.BIAS_KINDS)),
        tie_embeddings=draw(st.booleans()),
    )


mesh_specs = st.lists(st.tuples(IDENT, SMALL), max_size=4, unique_by=lambda a: a[0]).map(lambda a: MeshSpec(tuple(a)))
serve_specs = st.builds(
    ServeSpec, phase=st.sampled_from(S.PHASES), batch=SIZE, seq=SIZE, ffn=st.sampled_from(S.FFN_LAYOUTS),
    attn=st.sampled_from(S.ATTN_LAYOUTS), weights=st.sampled_from(S.WEIGHT_FORMATS),
    overlap=st.sampled_from(S.OVERLAPS), hardware=st.sampled_from(S.HARDWARE),
)
specs = st.builds(Spec, model=model_specs(), mesh=mesh_specs, serve=serve_specs, path=st.just("g.model"))


@settings(deadline=None)
@given(specs)
def test_valid_specs_round_trip(spec: Spec) -> None:
    text = format_spec(spec)
    again = parse_spec(text, "g.model")
    assert again == spec
    assert format_spec(again) == text


@settings(deadline=None)
@given(specs, st.sampled_from(["model", "serve"]), st.data())
def test_override_round_trip(spec: Spec, section: str, data: st.DataObject) -> None:
    """Setting a field to the value format_spec prints for it changes nothing."""
    obj = spec.model if section == "model" else spec.serve
    table = S._MODEL_FIELDS if section == "model" else S._SERVE_FIELDS
    name = data.draw(st.sampled_from(sorted(table)))
    value = S._fmt(getattr(obj, name))
    assert apply_overrides(spec, sets=[f"{section}.{name}={value}"]) == spec


OVERRIDE_TOKENS = ["serve", "model", "mesh", ".", "=", ",", " ", "batch", "phase", "heads", "kv_heads",
                   "d_head", "x", "y", "2", "0", "3", "-1", "2.5", "decode", "srve", "bach", "1", "é", "\x00"]
override_text = st.one_of(st.text(max_size=20), st.lists(st.sampled_from(OVERRIDE_TOKENS), max_size=8).map("".join))


@settings(deadline=None)
@given(st.sampled_from(EXAMPLE_TEXTS), st.one_of(st.none(), override_text), st.one_of(st.none(), override_text),
       st.one_of(st.none(), override_text), st.lists(override_text, max_size=3))
def test_random_overrides_apply_or_raise_spec_error(
    text: str, mesh: str | None, phase: str | None, batch: str | None, sets: list[str]
) -> None:
    spec = parse_spec(text)
    try:
        out = apply_overrides(spec, mesh=mesh, phase=phase, batch=batch, sets=sets)
    except SpecError as e:
        assert e.loc is not None and e.loc.file == "<command line>" and e.loc.line == 1 and e.loc.col >= 1
        assert str(e).startswith("<command line>:1:")
    else:
        assert parse_spec(format_spec(out)) == out
