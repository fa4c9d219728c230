"""Spec language: examples, defaults, printing, and the exact text of every kind of error.

Errors are asserted on their rendered text (message, caret line and hint), because that text
is what users see and judge the compiler by.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from compiler.spec import (
    MeshSpec,
    ModelSpec,
    ServeSpec,
    Spec,
    apply_overrides,
    format_spec,
    load_spec,
    parse_spec,
)
from ir.errors import SpecError

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.model"))

BASE = """\
model t {
  layers = 2
  d_model = 64
  heads = 4
  kv_heads = 1
  d_head = 16
  d_ff = 256
  vocab = 128
}
"""


def error(text: str, path: str = "t.model") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, path)
    return info.value


def rendered(text: str) -> str:
    return str(error(text))


def expect(text: str, want: str) -> None:
    assert rendered(text) == textwrap.dedent(want).strip("\n")


# ---------------------------------------------------------------------------------------------
# Examples and defaults


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    for name in ("palm-8b", "palm-62b", "palm-540b", "mt-nlg-530b", "tiny-mqa", "tiny-gqa", "tiny-gptj", "tiny-mha"):
        assert f"{name}.model" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert spec.path == str(path)
    assert spec.model.name == path.stem
    assert path.read_text().startswith("#"), "examples start with a comment saying where they come from"
    again = parse_spec(format_spec(spec), str(path))
    assert again == spec
    assert format_spec(again) == format_spec(spec)


def test_palm_540b() -> None:
    spec = load_spec(EXAMPLES[0].parent / "palm-540b.model")
    m = spec.model
    assert (m.layers, m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab) == (118, 18432, 48, 1, 256, 73728, 256000)
    assert (m.block, m.mlp, m.norm, m.bias, m.tie_embeddings) == ("parallel", "swiglu", "layernorm", "none", True)
    assert m.attention == "multiquery" and m.group_size == 48
    assert spec.mesh.axes == (("x", 4), ("y", 4), ("z", 4)) and spec.mesh.n_devices == 64
    assert spec.serve == ServeSpec(phase="decode", batch=64, seq=2048, ffn="2d-ws", attn="batch", weights="bf16", hardware="tpu-v4")


def test_palm_parameter_counts() -> None:
    """Reference §3: per-layer 3EF + 2EHd + 2Ed plus V·E embeddings reproduces the PaLM sizes."""
    for name, billions in (("palm-8b", 8.63), ("palm-62b", 62.50), ("palm-540b", 540.35)):
        m = load_spec(EXAMPLES[0].parent / f"{name}.model").model
        per_layer = 3 * m.d_model * m.d_ff + 2 * m.d_model * m.heads * m.d_head + 2 * m.d_model * m.d_head
        total = m.layers * per_layer + m.vocab * m.d_model
        assert round(total / 1e9, 2) == billions


def test_small_examples_have_the_promised_shapes() -> None:
    def get(n):
        return load_spec(EXAMPLES[0].parent / f"{n}.model")
    mqa, gqa, gptj, mha = get("tiny-mqa"), get("tiny-gqa"), get("tiny-gptj"), get("tiny-mha")
    assert (mqa.model.block, mqa.model.attention, mqa.model.mlp, mqa.mesh.n_devices) == ("parallel", "multiquery", "swiglu", 8)
    assert (mqa.serve.phase, mqa.serve.batch, mqa.serve.seq) == ("prefill", 8, 16)
    assert (gqa.model.attention, gqa.model.group_size, gqa.model.norm, gqa.model.rotary_style) == ("grouped", 4, "rmsnorm", "half")
    assert (gptj.model.block, gptj.model.attention, gptj.model.mlp, gptj.model.bias) == ("parallel", "multihead", "gelu-tanh", "mlp")
    assert gptj.model.rotary_style == "interleaved" and gptj.model.rotary_dim < gptj.model.d_head
    assert (mha.model.block, mha.model.attention, mha.model.mlp, mha.model.bias) == ("serial", "multihead", "gelu", "all")


def test_defaults() -> None:
    spec = parse_spec(BASE)
    m = spec.model
    assert (m.block, m.mlp, m.norm, m.norm_eps, m.rope_theta) == ("serial", "gelu", "layernorm", 1e-5, 10000.0)
    assert m.rotary_dim == m.d_head == 16, "rotary_dim defaults to d_head"
    assert (m.rotary_style, m.bias, m.tie_embeddings) == ("half", "none", False)
    assert spec.mesh == MeshSpec() and spec.mesh.n_devices == 1 and spec.mesh.names == ()
    assert spec.serve == ServeSpec()
    assert spec.path == "<spec>"


def test_layout_is_free() -> None:
    """Blocks in any order, comments, blank lines, CRLF, a brace right after the last field."""
    text = "# top\r\nserve { phase = decode }\r\n\r\nmesh {\r\n  x = 2  # two\r\n  y = 4 }\r\n" + BASE.replace("\n", "\r\n")
    spec = parse_spec(text)
    assert spec.serve.phase == "decode" and spec.mesh.axes == (("x", 2), ("y", 4))
    assert spec.mesh.size("y") == 4 and spec.mesh.sizes == (2, 4) and spec.mesh.n_devices == 8
    with pytest.raises(KeyError, match="no axis 'z'"):
        spec.mesh.size("z")


def test_values() -> None:
    text = BASE.replace("  vocab = 128\n", "  vocab = 128\n  norm_eps = 1e-6\n  rope_theta = 500000\n  tie_embeddings = true\n")
    m = parse_spec(text).model
    assert m.norm_eps == 1e-6 and m.rope_theta == 500000.0 and isinstance(m.rope_theta, float)
    assert m.tie_embeddings is True


def test_attention_kinds() -> None:
    def attention(heads: int, kv: int) -> tuple[str, int]:
        m = ModelSpec("m", 1, 8, heads, kv, 4, 8, 8)
        return m.attention, m.group_size

    assert attention(8, 8) == ("multihead", 1)
    assert attention(8, 1) == ("multiquery", 8)
    assert attention(8, 2) == ("grouped", 4)
    assert attention(1, 1) == ("multihead", 1)


def test_dataclasses_validate_themselves() -> None:
    with pytest.raises(SpecError, match="multiple of kv_heads"):
        ModelSpec("m", 1, 8, 4, 3, 4, 8, 8)
    with pytest.raises(SpecError, match="layers must be a positive integer"):
        ModelSpec("m", 0, 8, 4, 1, 4, 8, 8)
    with pytest.raises(SpecError, match="invalid|must be one of"):
        ModelSpec("m", 1, 8, 4, 1, 4, 8, 8, mlp="relu")
    with pytest.raises(SpecError, match="duplicate mesh axis 'x'"):
        MeshSpec((("x", 2), ("x", 2)))
    with pytest.raises(SpecError, match="batch must be a positive integer"):
        ServeSpec(batch=0)
    assert ModelSpec("m", 1, 8, 4, 1, 4, 8, 8, norm_eps=1).norm_eps == 1.0
    assert MeshSpec([["x", 2]]).axes == (("x", 2),)  # type: ignore[arg-type]


def test_format_is_canonical() -> None:
    text = format_spec(parse_spec(BASE + "mesh {\n x = 2\n}\nserve {\n batch = 3\n}\n"))
    assert text == textwrap.dedent("""\
        model t {
          layers         = 2
          d_model        = 64
          heads          = 4
          kv_heads       = 1
          d_head         = 16
          d_ff           = 256
          vocab          = 128
          block          = serial
          mlp            = gelu
          norm           = layernorm
          norm_eps       = 1e-05
          rope_theta     = 10000.0
          rotary_dim     = 16
          rotary_style   = half
          bias           = none
          tie_embeddings = false
        }

        mesh {
          x = 2
        }

        serve {
          phase    = prefill
          batch    = 3
          seq      = 128
          ffn      = 1d-ws
          attn     = heads
          weights  = f32
          overlap  = none
          hardware = cpu
          kv       = auto
          logits   = last
          pad      = true
        }
        """)
    assert "mesh" not in format_spec(parse_spec(BASE)), "a one-device mesh is left out"


# ---------------------------------------------------------------------------------------------
# Errors: fields and values


def test_unknown_field() -> None:
    expect(BASE.replace("heads = 4", "hedas = 4"), """
        t.model:4:3: spec error: unknown field 'hedas' in model block
            hedas = 4
            ^~~~~
          hint: did you mean 'heads'? valid choices: layers, d_model, heads, kv_heads, d_head, d_ff, vocab, block, mlp, norm, norm_eps, rope_theta, rotary_dim, rotary_style, bias, tie_embeddings, sliding_window, qk_norm, experts, top_k, router, norm_topk, expert_d_ff, shared_experts, shared_gate, router_bias
        """)


def test_unknown_serve_field() -> None:
    err = error(BASE + "serve {\n  phse = decode\n}\n")
    assert err.message == "unknown field 'phse' in serve block"
    assert (err.loc.line, err.loc.col, err.loc.length) == (11, 3, 4)
    assert err.hint.startswith("did you mean 'phase'?")


def test_name_is_not_a_field() -> None:
    err = error(BASE.replace("layers = 2", "name = x"))
    assert err.message == "unknown field 'name' in model block"
    assert err.hint == "the model's name goes in the block header: model NAME { ... }"


def test_bad_enum() -> None:
    expect(BASE.replace("  vocab = 128\n", "  vocab = 128\n  block = paralel\n"), """
        t.model:9:11: spec error: invalid value 'paralel' for block
            block = paralel
                    ^~~~~~~
          hint: did you mean 'parallel'? valid choices: parallel, serial
        """)


def test_bad_enum_far_from_any_choice() -> None:
    err = error(BASE + "serve {\n  hardware = abacus\n}\n")
    assert err.message == "invalid value 'abacus' for hardware"
    assert err.hint == "valid choices: tpu-v4, tpu-v5e, tpu-v5p, a100-80g, h100, h100-80g, h200, cpu"


@pytest.mark.parametrize(
    "line, message, hint",
    [
        ("layers = abc", "layers must be an integer, got 'abc'", "write a whole number such as 2 or 4096"),
        ("layers = 2.5", "layers must be an integer, got '2.5'", "write a whole number such as 2 or 4096"),
        ("layers = 0", "layers must be positive, got 0", None),
        ("layers = -3", "layers must be positive, got -3", None),
        ("layers = 99999999999999999999", "layers is too large: 99999999999999999999", "the largest accepted value is 4611686018427387904"),
        ("layers = 2\n  tie_embeddings = 3", "tie_embeddings must be true or false, got '3'", "valid choices: true, false"),
        ("layers = 2\n  tie_embeddings = True", "tie_embeddings must be true or false, got 'True'", "did you mean 'true'? valid choices: true, false"),
        ("layers = 2\n  norm_eps = abc", "norm_eps must be a number, got 'abc'", "write a number such as 1e-5 or 10000.0"),
        ("layers = 2\n  norm_eps = 0", "norm_eps must be positive, got 0", None),
        ("layers = 2\n  rope_theta = 1e999", "rope_theta is out of range: 1e999", None),
    ],
)
def test_wrong_type(line: str, message: str, hint: str | None) -> None:
    text = BASE.replace("layers = 2", line)
    err = error(text)
    bad_line = ("  " + line).split("\n")[-1]
    value = bad_line.split("= ")[1]
    assert err.message == message and err.hint == hint
    assert err.loc.line == 2 + line.count("\n")
    assert err.loc.col == 1 + bad_line.rindex(value) and err.loc.length == len(value)
    assert err.loc.source_line == bad_line


def test_mesh_errors() -> None:
    expect(BASE + "mesh {\n  x = 2\n  x = 4\n}\n", """
        t.model:12:3: spec error: duplicate mesh axis 'x'
            x = 4
            ^
          hint: it was already set at line 11; keep one
        """)
    expect(BASE + "mesh {\n  2x = 2\n}\n", """
        t.model:11:3: spec error: mesh axis name '2x' is not an identifier
            2x = 2
            ^~
          hint: axis names start with a letter or '_' and go on with letters, digits or '_'
        """)
    assert error(BASE + "mesh {\n  x = 0\n}\n").message == "mesh axis x must be positive, got 0"
    assert error(BASE + "mesh {\n  x = two\n}\n").message == "mesh axis x must be an integer, got 'two'"


def test_duplicate_field() -> None:
    expect(BASE.replace("layers = 2", "layers = 2\n  layers = 3"), """
        t.model:3:3: spec error: duplicate field 'layers' in model block
            layers = 3
            ^~~~~~
          hint: it was already set at line 2; keep one
        """)


def test_missing_fields_listed_at_once() -> None:
    expect(BASE.replace("  heads = 4\n", "").replace("  vocab = 128\n", ""), """
        t.model:1:1: spec error: model block is missing required fields: heads, vocab
          model t {
          ^~~~~
          hint: add one line per field, e.g. 'heads = ...'; required: layers, d_model, heads, kv_heads, d_head, d_ff, vocab
        """)
    err = error("\n\n  model t { layers = 2 }\n")
    assert err.message.endswith("fields: d_model, heads, kv_heads, d_head, d_ff, vocab")
    assert (err.loc.line, err.loc.col) == (3, 3)


# ---------------------------------------------------------------------------------------------
# Errors: consistency


def test_heads_not_multiple_of_kv_heads() -> None:
    expect(BASE.replace("kv_heads = 1", "kv_heads = 3"), """
        t.model:5:14: spec error: heads (4) must be a multiple of kv_heads (3)
            kv_heads = 3
                       ^
          hint: each K/V head serves heads/kv_heads query heads; kv_heads can be 1, 2, 4
        """)
    assert error(BASE.replace("kv_heads = 1", "kv_heads = 8")).message == "heads (4) must be a multiple of kv_heads (8)"


def test_rotary_dim() -> None:
    expect(BASE.replace("  vocab = 128\n", "  vocab = 128\n  rotary_dim = 7\n"), """
        t.model:9:16: spec error: rotary_dim must be even, got 7
            rotary_dim = 7
                         ^
          hint: rotary embeddings rotate pairs of dimensions
        """)
    expect(BASE.replace("  vocab = 128\n", "  vocab = 128\n  rotary_dim = 32\n"), """
        t.model:9:16: spec error: rotary_dim (32) exceeds d_head (16)
            rotary_dim = 32
                         ^~
          hint: rotary_dim is how many of each head's d_head dimensions are rotated
        """)
    # Defaulted from an odd d_head: the error points at d_head, the field actually written.
    expect(BASE.replace("d_head = 16", "d_head = 15"), """
        t.model:6:12: spec error: rotary_dim must be even, got 15 (it defaults to d_head)
            d_head = 15
                     ^~
          hint: rotary embeddings rotate pairs of dimensions
        """)
    assert parse_spec(BASE.replace("  vocab = 128\n", "  vocab = 128\n  rotary_dim = 8\n")).model.rotary_dim == 8


# ---------------------------------------------------------------------------------------------
# Errors: blocks and syntax


def test_unknown_block() -> None:
    expect(BASE + "mdoel u {\n}\n", """
        t.model:10:1: spec error: unknown block 'mdoel'
          mdoel u {
          ^~~~~
          hint: did you mean 'model'? valid choices: model, mesh, serve
        """)


def test_duplicate_block() -> None:
    expect(BASE + "serve {\n}\nserve {\n}\n", """
        t.model:12:1: spec error: duplicate serve block
          serve {
          ^~~~~
          hint: the serve block was already given at line 10; merge the two
        """)


def test_block_names() -> None:
    expect(BASE.replace("model t {", "model {"), """
        t.model:1:1: spec error: the model block needs a name
          model {
          ^~~~~
          hint: write 'model NAME {', e.g. 'model tiny {'
        """)
    expect(BASE + "mesh big {\n}\n", """
        t.model:10:6: spec error: the mesh block takes no name
          mesh big {
               ^~~
          hint: write 'mesh {'
        """)


def test_no_model_block() -> None:
    expect("mesh {\n  x = 2\n}\n", """
        t.model:1:1: spec error: no model block
          mesh {
          ^
          hint: a spec needs 'model NAME { ... }' setting at least layers, d_model, heads, kv_heads, d_head, d_ff, vocab
        """)
    err = error("")
    assert err.message == "no model block" and err.loc is not None and err.loc.source_line is None


def test_several_fields_on_one_line() -> None:
    s = parse_spec(BASE.replace("layers = 2", "layers = 3 norm = rmsnorm") + "mesh { x = 2  y = 2  z = 2 }\n"
                   "serve { phase = decode  batch = 8\n  seq = 32 }\n", "t.model")
    assert (s.model.layers, s.model.norm, s.model.d_ff) == (3, "rmsnorm", 256)
    assert s.mesh.axes == (("x", 2), ("y", 2), ("z", 2))
    assert (s.serve.phase, s.serve.batch, s.serve.seq) == ("decode", 8, 32)
    expect(BASE.replace("layers = 2", "layers = 2 d_ff = 3"), """
        t.model:7:3: spec error: duplicate field 'd_ff' in model block
            d_ff = 256
            ^~~~
          hint: it was already set at line 2; keep one
        """)
    expect(BASE.replace("layers = 2", "layers = 2 heads"), """
        t.model:2:19: spec error: unexpected end of line; expected '='
            layers = 2 heads
                            ^
          hint: fields are written 'name = value'
        """)


def test_missing_value() -> None:
    expect(BASE.replace("layers = 2", "layers ="), """
        t.model:2:11: spec error: unexpected end of line; expected a value
            layers =
                    ^
          hint: give a value after '='
        """)


def test_missing_equals() -> None:
    expect(BASE.replace("layers = 2", "layers 2"), """
        t.model:2:10: spec error: unexpected '2'; expected '='
            layers 2
                   ^
          hint: fields are written 'name = value'
        """)
    expect(BASE.replace("layers = 2", "layers: 2"), """
        t.model:2:9: spec error: unexpected character ':'; expected '='
            layers: 2
                  ^
          hint: fields are written 'name = value'
        """)


def test_quotes() -> None:
    expect(BASE.replace("layers = 2", 'layers = "2"'), """
        t.model:2:12: spec error: unexpected character '"'; expected a value
            layers = "2"
                     ^
          hint: values are written without quotes
        """)


def test_unclosed_block() -> None:
    expect(BASE + "serve {\n  batch = 2\n", """
        t.model:11:12: spec error: unexpected end of file; expected a field name or '}'
            batch = 2
                     ^
          hint: the block opened at line 10 has no closing '}'
        """)


def test_field_outside_block() -> None:
    expect("layers = 2\n", """
        t.model:1:8: spec error: unexpected '='; expected a model name or '{'
          layers = 2
                 ^
          hint: fields go inside a block: model NAME { ... }, mesh { ... } or serve { ... }
        """)


def test_stray_brace_and_nesting() -> None:
    expect(BASE + "}\n", """
        t.model:10:1: spec error: unexpected '}'; expected a block ('model NAME {', 'mesh {' or 'serve {')
          }
          ^
          hint: this '}' closes no block
        """)
    expect(BASE.replace("layers = 2", "mesh {"), """
        t.model:2:8: spec error: unexpected '{'; expected '='
            mesh {
                 ^
          hint: blocks cannot be nested; close the enclosing block with '}' first
        """)


def test_control_characters_keep_the_caret_aligned() -> None:
    err = error(BASE.replace("  layers = 2", "\tlayers = 2\x00"))
    assert err.message == "unexpected character U+0000; expected a field name or '}'"  # several fields may share a line
    assert (err.loc.line, err.loc.col) == (2, 12)
    assert err.loc.source_line == " layers = 2?"
    assert str(err).splitlines()[2] == "  " + " " * 11 + "^"


def test_form_feed_does_not_shift_lines() -> None:
    # str.splitlines would split at \x0c; lark and the locations must not.
    err = error("\x0c\n" + BASE.replace("layers = 2", "layers = x"))
    assert err.loc.line == 3 and err.loc.source_line == "  layers = x"


def test_load_spec_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "missing.model")
    assert info.value.loc is None
    assert str(info.value).startswith(f"spec error: cannot read spec file '{tmp_path / 'missing.model'}'")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"model \xff {\n}\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path)


def test_load_spec_locates_errors_in_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x.model"
    p.write_text(BASE.replace("heads = 4", "heads = four"))
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert str(info.value).startswith(f"{p}:4:11: spec error: heads must be an integer, got 'four'")


# ---------------------------------------------------------------------------------------------
# Overrides


@pytest.fixture
def gqa() -> Spec:
    return load_spec(EXAMPLES[0].parent / "tiny-gqa.model")


def cli_error(spec: Spec, **kw: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        apply_overrides(spec, **kw)  # type: ignore[arg-type]
    assert info.value.loc is not None and info.value.loc.file == "<command line>" and info.value.loc.line == 1
    return info.value


def test_overrides_good(gqa: Spec) -> None:
    s = apply_overrides(gqa, mesh="x=2,y=2,z=2", phase="decode", batch=8, seq="64", ffn="2d-ws", attn="batch",
                        weights="int8", overlap="looped", sets=["model.layers=4", "mesh.y=4", "mesh.w=1"])
    assert s.mesh.axes == (("x", 2), ("y", 4), ("z", 2), ("w", 1))
    assert s.serve == ServeSpec("decode", 8, 64, "2d-ws", "batch", "int8", "looped", gqa.serve.hardware)
    assert s.model == dataclasses.replace(gqa.model, layers=4)
    assert s.path == gqa.path
    assert apply_overrides(gqa) == gqa
    assert apply_overrides(gqa, mesh="").mesh == MeshSpec()
    assert apply_overrides(gqa, mesh="1").mesh.n_devices == 1
    assert apply_overrides(gqa, sets=[" serve.batch = 3 "]).serve.batch == 3
    assert apply_overrides(gqa, sets=["model.name=other"]).model.name == "other"
    assert apply_overrides(gqa, sets=["serve.batch=2", "serve.batch=5"]).serve.batch == 5, "later wins"


def test_override_rotary_dim_follows_d_head(gqa: Spec) -> None:
    assert gqa.model.rotary_dim == gqa.model.d_head == 8
    m = apply_overrides(gqa, sets=["model.d_head=32"]).model
    assert m.rotary_dim == 32
    gptj = load_spec(EXAMPLES[0].parent / "tiny-gptj.model")
    assert apply_overrides(gptj, sets=["model.d_head=32"]).model.rotary_dim == 8, "a partial rotary_dim stays"


def test_override_bad_set_value(gqa: Spec) -> None:
    assert str(cli_error(gqa, sets=["serve.batch=abc"])) == textwrap.dedent("""\
        <command line>:1:13: spec error: batch must be an integer, got 'abc'
          serve.batch=abc
                      ^~~
          hint: write a whole number such as 2 or 4096""")


def test_override_unknown_field_and_section(gqa: Spec) -> None:
    assert str(cli_error(gqa, sets=["serve.bach=8"])) == textwrap.dedent("""\
        <command line>:1:7: spec error: unknown field 'bach' in serve block
          serve.bach=8
                ^~~~
          hint: did you mean 'batch'? valid choices: phase, batch, seq, ffn, attn, weights, overlap, hardware, kv, logits, microbatches, pad, expert_axes, capacity_factor""")
    err = cli_error(gqa, sets=["srve.batch=8"])
    assert err.message == "unknown section 'srve'" and err.hint.startswith("did you mean 'serve'?")
    assert (err.loc.col, err.loc.length) == (1, 4)
    err = cli_error(gqa, sets=["batch=8"])
    assert err.message == "overrides are written SECTION.FIELD=VALUE, got 'batch'"
    assert err.hint == "did you mean 'serve.batch'?"
    err = cli_error(gqa, sets=["serve.batch"])
    assert err.message == "overrides are written SECTION.FIELD=VALUE, got 'serve.batch'"
    assert cli_error(gqa, sets=["serve.batch="]).message == "missing value for serve.batch"
    assert cli_error(gqa, sets=[".x=3"]).message == "missing section"
    assert cli_error(gqa, sets=["serve.batch=8 9"]).message == "malformed value for serve.batch: '8 9'"


def test_override_bad_enum_flag(gqa: Spec) -> None:
    assert str(cli_error(gqa, phase="decod")) == textwrap.dedent("""\
        <command line>:1:7: spec error: invalid value 'decod' for phase
          phase=decod
                ^~~~~
          hint: did you mean 'decode'? valid choices: prefill, decode""")
    assert cli_error(gqa, batch=0).message == "batch must be positive, got 0"
    assert cli_error(gqa, ffn="2dws").hint.startswith("did you mean '2d-ws'?")


def test_override_mesh_errors(gqa: Spec) -> None:
    assert str(cli_error(gqa, mesh="x=2,y=0")) == textwrap.dedent("""\
        <command line>:1:7: spec error: mesh axis y must be positive, got 0
          x=2,y=0
                ^""")
    err = cli_error(gqa, mesh="x=2,x=2")
    assert (err.message, err.loc.col, err.hint) == ("duplicate mesh axis 'x'", 5, "it was already set at column 1; keep one")
    assert cli_error(gqa, mesh="x").message == "mesh axes are written NAME=SIZE, got 'x'"
    assert cli_error(gqa, mesh="2=2").message == "mesh axis name '2' is not an identifier"
    err = cli_error(gqa, mesh="x=2, y = 2.5")
    assert (err.message, err.loc.col, err.loc.length) == ("mesh axis y must be an integer, got '2.5'", 10, 3)
    assert cli_error(gqa, sets=["mesh.x=0"]).message == "mesh axis x must be positive, got 0"


def test_override_inconsistency_points_at_the_override(gqa: Spec) -> None:
    assert str(cli_error(gqa, sets=["model.kv_heads=3"])) == textwrap.dedent("""\
        <command line>:1:16: spec error: heads (8) must be a multiple of kv_heads (3)
          model.kv_heads=3
                         ^
          hint: each K/V head serves heads/kv_heads query heads; kv_heads can be 1, 2, 4, 8""")
    assert apply_overrides(gqa, sets=["model.heads=6"]).model.group_size == 3  # kv_heads = 2 divides 6 ...
    err = cli_error(gqa, sets=["model.heads=5"])  # ... but not 5: the file's kv_heads has no location
    assert err.message == "heads (5) must be a multiple of kv_heads (2)"
    assert err.loc.source_line == "model.heads=5" and err.loc.col == 13
