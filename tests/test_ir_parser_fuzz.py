"""The IR front end's error contract under random input.

For any text, ``parse_module`` either returns a module or raises ``ParseError``; a module it
returns either verifies or makes ``verify`` raise ``VerifyError``. Nothing else may escape
(the CLI would report it as an internal error, exit 2). Inputs: random text over the IR's own
alphabet, random token soup, and mutations of real printed modules (characters deleted,
inserted or replaced, lines dropped, duplicated or swapped) — the last reach deep into the
parser and the verifier, since most of such a text is still well formed.

Inputs found to break the contract are pinned below as regression cases (``KNOWN_LEAKS``),
kept as regression cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from ir.errors import ParseError, VerifyError
from ir.parser import parse_module
from ir.printer import print_module
from ir.verifier import verify

pytestmark = pytest.mark.fuzz  # `make fuzz` runs this file with 10,000 examples per property

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SMALL = """\
module @m mesh<x=2, y=2> {
  func @body(
      %c: f32[B=4{x}, E=8] partial{y},
      %w: bf16[E=8, F=4]
  ) -> (f32[B=4{x}, E=8] partial{y}, f32[B=4{x}, F=4] partial{y}) {
    %h = einsum(%c, %w) {spec = "BE,EF->BF"} : f32[B=4{x}, F=4] partial{y}
    return %c, %h
  }
  entry func @main(
      input %tokens: i32[B=4, L=2],
      weight %ws: bf16[N=3, E=8, F=4],
      cache %c: f32[B=4{x}, E=8] partial{y}
  ) -> (f32[B=4{x}, E=8] partial{y}) {
    %c.1, %hs = scan(%c, %ws) {body = @body, carry = 1, consts = 0} : f32[B=4{x}, E=8] partial{y}, f32[N=3, B=4{x}, F=4] partial{y}
    %s = scale(%c.1) {factor = 0.5} : f32[B=4{x}, E=8] partial{y}
    %u = unary(%s) {fn = "neg"} : f32[B=4{x}, E=8] partial{y}
    return %u
  }
}
"""


def _seeds() -> list[str]:
    """A small hand-written module, the builder's output, and sharded modules with collectives
    (the default pipeline's output)."""
    out = [SMALL]
    for name, phase in [("tiny-mqa", "prefill"), ("tiny-gqa", "decode"), ("tiny-gptj", "decode"), ("tiny-mha", "prefill")]:
        spec = apply_overrides(load_spec(EXAMPLES / f"{name}.model"), phase=phase)
        out.append(print_module(build_for(spec, compile_config(spec))))
    for name in ("tiny-mqa", "tiny-gptj"):
        spec = load_spec(EXAMPLES / f"{name}.model")
        out.append(print_module(compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec)).module))
    return out


SEEDS = _seeds()

ALPHABET = "%@{}[]()<>=,:;.-_ \n\t\"\\/+*0123456789eEaxyzBDEFHKLNTVfimnprstu"
TOKENS = ["module", "func", "entry", "return", "mesh", "partial", "input", "weight", "cache", "@m", "@f",
          "%x", "%y", "%0", "f32", "bf16", "i32", "[", "]", "{", "}", "(", ")", "<", ">", "=", ",", ":",
          "->", "B=2", "E=8{x}", "x=2", "einsum", "scan", "unary", "scale", "cast", "spec", "fn", "body",
          "\"BE,EF->BF\"", "\"neg\"", "1.0", "-3", "1e5", "true", "false", "//", "\n", " "]


def check_contract(text: str) -> None:
    """The property: only ParseError or VerifyError may come out, and a parsed module prints."""
    try:
        m = parse_module(text, "fuzz.ir")
    except ParseError as e:
        e.render()  # rendering a diagnostic must not fail either
        return
    try:
        verify(m, "fuzz.ir")
    except VerifyError as e:
        e.render()
        return
    print_module(m)


@given(st.text(alphabet=ALPHABET, max_size=200))
def test_random_text(text: str) -> None:
    check_contract(text)


@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join))
def test_token_soup(text: str) -> None:
    check_contract(text)


@st.composite
def mutants(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["delete", "insert", "replace", "drop-line", "dup-line", "swap-lines", "cut"]))
        if kind in ("delete", "insert", "replace") and text:
            i = draw(st.integers(0, len(text) - 1))
            c = draw(st.sampled_from(ALPHABET) | st.characters())
            text = {"delete": text[:i] + text[i + 1:], "insert": text[:i] + c + text[i:],
                    "replace": text[:i] + c + text[i + 1:]}[kind]
        elif kind == "drop-line":
            del lines[draw(st.integers(0, len(lines) - 1))]
            text = "\n".join(lines)
        elif kind == "dup-line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind == "swap-lines":
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif text:
            text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=max(300, settings.default.max_examples))  # the fuzz profile's 10,000 when larger
@given(mutants())
@example(SMALL.replace("partial{y}", "partial{q}", 1))  # unknown mesh axis
@example(SMALL.replace("mesh<x=2, y=2>", "mesh<x=2, x=2>"))
@example(SMALL.replace('"neg"', '"gelu"'))  # gelu of a partial sum
@example(SMALL.replace("F=4", "F=0", 1))
def test_mutated_modules(text: str) -> None:
    check_contract(text)


@pytest.mark.parametrize("text", SEEDS, ids=["small", "mqa", "gqa", "gptj", "mha", "mqa-sharded", "gptj-sharded"])
def test_seeds_are_valid(text: str) -> None:
    verify(parse_module(text))


# ---- regression cases: inputs that broke the contract ---------------------------------------

FN = "module @m {{ func @f(%x: f32[A=2]) -> (f32[A=2]) {{\n  {op}\n  return %y\n}} }}"
MESH_FN = "module @m mesh<x=2> {{ func @f({params}) -> (f32[A=2]) {{\n  {op}\n  return %y\n}} }}"
BIG = "9" * 5000

KNOWN_LEAKS = {
    # ir/parser.py _Builder.value: json.loads on the ESCAPED_STRING token raises JSONDecodeError
    # (a ValueError) for an escape JSON does not know or a raw control character.
    "string-bad-escape": FN.format(op='%y = unary(%x) {fn = "ge\\qlu"} : f32[A=2]'),
    "string-raw-tab": FN.format(op='%y = unary(%x) {fn = "ge\tlu"} : f32[A=2]'),
    # ir/parser.py: int() of a literal over Python's 4300-digit limit raises ValueError outside
    # any try (mesh sizes, number attributes; dim sizes are caught).
    "mesh-size-huge": f"module @m mesh<x={BIG}> {{ }}",
    "attr-int-huge": FN.format(op=f"%y = scale(%x) {{factor = {BIG}}} : f32[A=2]"),
    # ir/ops.py parse_einsum: spec.split("->") unpacked into two names -> ValueError.
    "einsum-two-arrows": FN.format(op='%y = einsum(%x) {spec = "A->A->A"} : f32[A=2]'),
    # ir/ops.py Cast.infer: TensorType rejects the unknown dtype with ValueError.
    "cast-unknown-dtype": FN.format(op='%y = cast(%x) {dtype = "f99"} : f32[A=2]'),
    # ir/ops.py Binary.infer / Einsum.infer / Embed.infer build a TensorType from operand dims
    # without checking that one mesh axis shards two result dims, or shards a dim and is partial.
    "binary-axis-shards-two-dims": MESH_FN.format(
        params="%a: f32[A=2{x}], %b: f32[B=2{x}]", op='%y = binary(%a, %b) {fn = "add"} : f32[A=2]'),
    "einsum-partial-overlaps-sharded": MESH_FN.format(
        params="%a: f32[C=2{x}], %b: f32[A=2{x}]", op='%y = einsum(%a, %b) {spec = "C,A->A"} : f32[A=2]'),
    "embed-partial-overlaps-sharded": MESH_FN.format(
        params="%t: f32[V=2{x}, E=2], %k: i32[B=2{x}, L=1]", op="%y = embed(%t, %k) : f32[A=2]"),
    # ir/ops.py Scan.infer: a body result that already has an N dim is stacked along a second N.
    "scan-result-with-N": """module @m {
  func @body(%c: f32[N=2], %w: f32[B=1]) -> (f32[N=2], f32[N=2]) {
    return %c, %c
  }
  func @f(%c: f32[N=2], %ws: f32[N=4, B=1]) -> (f32[N=2]) {
    %y, %b = scan(%c, %ws) {body = @body, carry = 1, consts = 0} : f32[N=2], f32[N=2]
    return %y
  }
}""",
}


@pytest.mark.parametrize(
    "text",
    [pytest.param(t, id=k) for k, t in KNOWN_LEAKS.items()])
def test_known_leaks(text: str) -> None:
    check_contract(text)


def test_parse_error_points_at_the_right_line_after_a_form_feed() -> None:
    r"""lark counts lines by '\n' only; the caret line must be the same line."""
    text = "module @m {\x0c func @f() -> () {\n  return\n} } junk"
    with pytest.raises(ParseError) as ei:
        parse_module(text, "ff.ir")
    assert ei.value.loc is not None and ei.value.loc.line == 3
    assert ei.value.loc.source_line == "} } junk"
