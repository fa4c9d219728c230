"""Verifier diagnostics, asserted on their full rendered text (message, location, caret line).

Each case is a small hand-written .ir text in printed layout, so that the line numbers in the
expected diagnostics can be read off the case. Errors at an op point at the op's own source
position; errors about a function (its parameters, its results) point at its ``func`` line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from compiler.driver import build_for, compile_config
from compiler.spec import apply_overrides, load_spec
from ir.errors import VerifyError
from ir.module import Module
from ir.parser import parse_module
from ir.printer import print_module
from ir.types import Dim, TensorType
from ir.verifier import verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def diagnose(text: str) -> str:
    m = parse_module(textwrap.dedent(text), "case.ir")
    with pytest.raises(VerifyError) as ei:
        verify(m, "case.ir")
    return ei.value.render()


def expect(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


MATMUL = """\
    module @m mesh<x=2, y=4> {{
      func @f(
          %a: f32[B=4, E=8],
          %w: f32[E=8, F=16]
      ) -> (f32[B=4, F=16]) {{
        {op}
        return %h
      }}
    }}
    """


def matmul(op: str) -> str:
    return MATMUL.format(op=op)


CASES: dict[str, tuple[str, str]] = {
    "undefined-value": (
        matmul('%h = einsum(%a, %q) {spec = "BE,EF->BF"} : f32[B=4, F=16]'),
        """
        case.ir:6:5: verify error: use of undefined value %q
              %h = einsum(%a, %q) {spec = "BE,EF->BF"} : f32[B=4, F=16]
              ^
        """),
    "defined-twice": (
        """\
        module @m {
          func @f(
              %a: f32[B=4]
          ) -> (f32[B=4]) {
            %h = unary(%a) {fn = "relu"} : f32[B=4]
            %h = unary(%h) {fn = "relu"} : f32[B=4]
            return %h
          }
        }
        """,
        """
        case.ir:6:5: verify error: value %h defined twice
              %h = unary(%h) {fn = "relu"} : f32[B=4]
              ^
        """),
    "param-declared-twice": (
        """\
        module @m {
          func @f(
              %x: f32[B=4],
              %x: f32[B=4]
          ) -> (f32[B=4]) {
            return %x
          }
        }
        """,
        """
        case.ir:2:3: verify error: parameter %x of @f declared twice
            func @f(
            ^~~~~~~~
        """),
    "wrong-size": (
        matmul('%h = einsum(%a, %w) {spec = "BE,EF->BF"} : f32[B=4, F=8]'),
        """
        case.ir:6:5: verify error: %h is annotated f32[B=4, F=8] but einsum gives f32[B=4, F=16]
              %h = einsum(%a, %w) {spec = "BE,EF->BF"} : f32[B=4, F=8]
              ^
        """),
    "wrong-dtype": (
        matmul('%h = einsum(%a, %w) {spec = "BE,EF->BF"} : bf16[B=4, F=16]'),
        """
        case.ir:6:5: verify error: %h is annotated bf16[B=4, F=16] but einsum gives f32[B=4, F=16]
              %h = einsum(%a, %w) {spec = "BE,EF->BF"} : bf16[B=4, F=16]
              ^
        """),
    "missing-partial": (
        """\
        module @m mesh<x=2> {
          func @f(
              %a: f32[B=4, E=8{x}],
              %w: f32[E=8{x}, F=16]
          ) -> (f32[B=4, F=16]) {
            %h = einsum(%a, %w) {spec = "BE,EF->BF"} : f32[B=4, F=16]
            return %h
          }
        }
        """,
        """
        case.ir:6:5: verify error: %h is annotated f32[B=4, F=16] but einsum gives f32[B=4, F=16] partial{x}
              %h = einsum(%a, %w) {spec = "BE,EF->BF"} : f32[B=4, F=16]
              ^
        """),
    "spurious-partial": (
        """\
        module @m mesh<x=2> {
          func @f(
              %a: f32[B=4, E=8]
          ) -> (f32[B=4, E=8] partial{x}) {
            %h = cast(%a) {dtype = "f32"} : f32[B=4, E=8] partial{x}
            return %h
          }
        }
        """,
        """
        case.ir:5:5: verify error: %h is annotated f32[B=4, E=8] partial{x} but cast gives f32[B=4, E=8]
              %h = cast(%a) {dtype = "f32"} : f32[B=4, E=8] partial{x}
              ^
        """),
    "einsum-spec-mismatch": (
        matmul('%h = einsum(%a, %w) {spec = "BD,EF->BF"} : f32[B=4, F=16]'),
        """
        case.ir:6:5: verify error: einsum operand 0 has dims BE, but the spec says BD
              %h = einsum(%a, %w) {spec = "BD,EF->BF"} : f32[B=4, F=16]
              ^
        """),
    "einsum-term-count": (
        matmul('%h = einsum(%a, %w) {spec = "BE->B"} : f32[B=4]'),
        """
        case.ir:6:5: verify error: einsum 'BE->B' has 1 terms but 2 operands
              %h = einsum(%a, %w) {spec = "BE->B"} : f32[B=4]
              ^
        """),
    "einsum-output-dim-from-nowhere": (
        matmul('%h = einsum(%a, %w) {spec = "BE,EF->BG"} : f32[B=4, G=2]'),
        """
        case.ir:6:5: verify error: einsum spec 'BE,EF->BG': output dim G appears in no operand
              %h = einsum(%a, %w) {spec = "BE,EF->BG"} : f32[B=4, G=2]
              ^
        """),
    "not-divisible": (
        """\
        module @m mesh<x=2, y=4> {
          func @f(
              %a: f32[B=4, E=6{x,y}]
          ) -> (f32[B=4, E=6{x,y}]) {
            return %a
          }
        }
        """,
        """
        case.ir:2:3: verify error: parameter %a: dim E=6 does not divide over {x,y} (8 devices)
            func @f(
            ^~~~~~~~
        """),
    "unknown-mesh-axis": (
        """\
        module @m mesh<x=2> {
          func @f(
              %a: f32[B=4{z}, E=8]
          ) -> (f32[B=4{z}, E=8]) {
            return %a
          }
        }
        """,
        """
        case.ir:2:3: verify error: parameter %a: type f32[B=4{z}, E=8] uses mesh axis 'z', which the mesh (x) does not have
            func @f(
            ^~~~~~~~
        """),
    "unknown-mesh-axis-one-device": (
        """\
        module @m {
          func @f(
              %a: f32[B=4] partial{x}
          ) -> (f32[B=4] partial{x}) {
            return %a
          }
        }
        """,
        """
        case.ir:2:3: verify error: parameter %a: type f32[B=4] partial{x} uses mesh axis 'x', which the mesh (one device) does not have
            func @f(
            ^~~~~~~~
        """),
    "sharding-disagreement": (
        """\
        module @m mesh<x=2, y=2> {
          func @f(
              %a: f32[B=4{x}],
              %b: f32[B=4{y}]
          ) -> (f32[B=4{x}]) {
            %h = binary(%a, %b) {fn = "add"} : f32[B=4{x}]
            return %h
          }
        }
        """,
        """
        case.ir:6:5: verify error: binary add: operands disagree on the sharding of dim B: {x} vs {y}
              %h = binary(%a, %b) {fn = "add"} : f32[B=4{x}]
              ^
        """),
    "partial-into-nonlinear-op": (
        """\
        module @m mesh<x=2> {
          func @f(
              %a: f32[B=4] partial{x}
          ) -> (f32[B=4] partial{x}) {
            %h = unary(%a) {fn = "gelu"} : f32[B=4] partial{x}
            return %h
          }
        }
        """,
        """
        case.ir:5:5: verify error: unary gelu is not linear: its operand is a partial sum over {x}; reduce it first (all-reduce or reduce-scatter)
              %h = unary(%a) {fn = "gelu"} : f32[B=4] partial{x}
              ^
        """),
    "scan-body-missing": (
        """\
        module @m {
          func @f(
              %x: f32[B=4],
              %ws: f32[N=2, B=4]
          ) -> (f32[B=4]) {
            %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
            return %y
          }
        }
        """,
        """
        case.ir:6:5: verify error: scan body @layer is not defined
              %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
              ^
        """),
    "scan-body-is-entry": (
        """\
        module @m {
          entry func @layer(
              %x: f32[B=4],
              %w: f32[B=4]
          ) -> (f32[B=4]) {
            return %x
          }
          func @f(
              %x: f32[B=4],
              %ws: f32[N=2, B=4]
          ) -> (f32[B=4]) {
            %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
            return %y
          }
        }
        """,
        """
        case.ir:12:5: verify error: scan body @layer is an entry function
              %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
              ^
        """),
    "scan-body-signature": (
        """\
        module @m {
          func @layer(
              %x: f32[B=4],
              %w: f32[E=4]
          ) -> (f32[B=4]) {
            return %x
          }
          func @f(
              %x: f32[B=4],
              %ws: f32[N=2, B=4]
          ) -> (f32[B=4]) {
            %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
            return %y
          }
        }
        """,
        """
        case.ir:12:5: verify error: scan: body @layer takes (f32[B=4], f32[E=4]) but is given (f32[B=4], f32[B=4])
              %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
              ^
        """),
    "scan-stacked-operand-without-N": (
        """\
        module @m {
          func @layer(
              %x: f32[B=4],
              %w: f32[B=4]
          ) -> (f32[B=4]) {
            return %x
          }
          func @f(
              %x: f32[B=4],
              %ws: f32[B=4]
          ) -> (f32[B=4]) {
            %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
            return %y
          }
        }
        """,
        """
        case.ir:12:5: verify error: scan: stacked operand 1 must have a leading unsharded N dim, got f32[B=4]
              %y = scan(%x, %ws) {body = @layer, carry = 1, consts = 0} : f32[B=4]
              ^
        """),
    "scan-cycle": (
        """\
        module @m {
          func @a(
              %x: f32[B=4]
          ) -> (f32[B=4]) {
            %y = scan(%x) {body = @a, carry = 1, consts = 0} : f32[B=4]
            return %y
          }
        }
        """,
        """
        case.ir:2:3: verify error: functions call each other in a cycle: @a -> @a
            func @a(
            ^~~~~~~~
        """),
    "wrong-return-types": (
        """\
        module @m {
          func @f(
              %a: f32[B=4],
              %b: bf16[B=4]
          ) -> (f32[B=4], f32[B=4]) {
            return %a, %b
          }
        }
        """,
        """
        case.ir:2:3: verify error: @f declares results (f32[B=4], f32[B=4]) but returns (f32[B=4], bf16[B=4])
            func @f(
            ^~~~~~~~
        """),
    "wrong-return-count": (
        """\
        module @m {
          func @f(
              %a: f32[B=4]
          ) -> (f32[B=4], f32[B=4]) {
            return %a
          }
        }
        """,
        """
        case.ir:2:3: verify error: @f declares results (f32[B=4], f32[B=4]) but returns (f32[B=4])
            func @f(
            ^~~~~~~~
        """),
    "return-undefined": (
        """\
        module @m {
          func @f(
              %a: f32[B=4]
          ) -> (f32[B=4]) {
            return %q
          }
        }
        """,
        """
        case.ir:2:3: verify error: @f returns undefined value %q
            func @f(
            ^~~~~~~~
        """),
    "softmax-over-sharded-dim": (
        """\
        module @m mesh<x=2> {
          func @f(
              %a: f32[B=4, T=8{x}]
          ) -> (f32[B=4, T=8{x}]) {
            %h = softmax(%a) {dim = "T"} : f32[B=4, T=8{x}]
            return %h
          }
        }
        """,
        """
        case.ir:5:5: verify error: softmax needs dim T whole on every device, but it is sharded over {x}; all-gather it first
              %h = softmax(%a) {dim = "T"} : f32[B=4, T=8{x}]
              ^
        """),
    "unknown-unary-function": (
        """\
        module @m {
          func @f(
              %a: f32[B=4]
          ) -> (f32[B=4]) {
            %h = unary(%a) {fn = "softplus"} : f32[B=4]
            return %h
          }
        }
        """,
        """
        case.ir:5:5: verify error: unknown unary function 'softplus'; valid: gelu, gelu_tanh, silu, relu, exp, tanh, rsqrt, neg, square, sigmoid
              %h = unary(%a) {fn = "softplus"} : f32[B=4]
              ^
        """),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagnostic(case: str) -> None:
    text, want = CASES[case]
    assert diagnose(text) == expect(want)


def test_valid_cases_verify() -> None:
    """The fixed versions of a few cases pass, so each case fails for the stated reason only."""
    verify(parse_module(textwrap.dedent(matmul('%h = einsum(%a, %w) {spec = "BE,EF->BF"} : f32[B=4, F=16]'))))
    verify(parse_module(textwrap.dedent(CASES["missing-partial"][0]).replace(
        ": f32[B=4, F=16]\n", ": f32[B=4, F=16] partial{x}\n").replace(
        "-> (f32[B=4, F=16])", "-> (f32[B=4, F=16] partial{x})")))


# ---- modules built in memory (no source locations): the printed module is the source ----------


def _tiny() -> Module:
    spec = apply_overrides(load_spec(EXAMPLES / "tiny-mqa.model"), phase="decode")
    return build_for(spec, compile_config(spec))


def test_built_module_error_points_into_its_printed_form() -> None:
    m = _tiny()
    layer = m.function("decode_layer")
    i = next(i for i, op in enumerate(layer.ops) if op.kind == "softmax")
    bad = layer.ops[i].with_(types=(layer.ops[i].type.with_dtype("bf16"),))
    m = m.with_function(layer.with_ops(layer.ops[:i] + (bad,) + layer.ops[i + 1:]))
    with pytest.raises(VerifyError) as ei:
        verify(m, "<built>")
    lines = print_module(m).splitlines()
    n = next(k for k, s in enumerate(lines, 1) if "%probs = softmax(" in s)
    src = lines[n - 1]
    assert ei.value.render() == "\n".join([
        f"<built>:{n}:5: verify error: %probs is annotated bf16[B=8, H=4, L=1, T=16] but softmax gives "
        "f32[B=8, H=4, L=1, T=16]",
        "  " + src,
        "      ^" + "~" * (len(src.strip()) - 1),
    ])


def test_repeated_function_names() -> None:
    m = _tiny()
    m = Module(m.name, m.mesh, m.functions + (m.functions[1],))
    with pytest.raises(VerifyError, match=r"function names repeat: \['decode', 'decode_layer', 'decode_layer'\]"):
        verify(m)


def test_operand_count_checked_on_built_ops() -> None:
    m = _tiny()
    fn = m.function("decode")
    op = fn.ops[0]  # embed(%embed, %tokens)
    m = m.with_function(fn.with_ops((op.with_(operands=op.operands[:1]),) + fn.ops[1:]))
    with pytest.raises(VerifyError, match=r"embed takes 2\.\.2 operands, got 1"):
        verify(m)


def test_types_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="a mesh axis shards two dims"):
        TensorType("f32", (Dim("A", 2, ("x",)), Dim("B", 2, ("x",))))
    with pytest.raises(ValueError, match="overlap sharded axes"):
        TensorType("f32", (Dim("A", 2, ("x",)),), frozenset({"x"}))
    with pytest.raises(ValueError, match="repeated dim name"):
        TensorType("f32", (Dim("A", 2), Dim("A", 2)))


def test_function_diagnostic_points_at_the_source_func_line() -> None:
    """A parsed module's function-level errors should point at the ``func`` line of the
    source, not at the line the function would have in the printed module."""
    text = "// a comment\n// another\n\nmodule @m {\n  func @f(%a: f32[B=4]) -> (bf16[B=4]) {\n    return %a\n  }\n}\n"
    with pytest.raises(VerifyError) as ei:
        verify(parse_module(text, "case.ir"), "case.ir")
    assert ei.value.render().splitlines()[:2] == [
        "case.ir:5:3: verify error: @f declares results (bf16[B=4]) but returns (f32[B=4])",
        "    func @f(%a: f32[B=4]) -> (bf16[B=4]) {",
    ]
