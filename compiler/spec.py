"""Model spec language: ``model``/``mesh``/``serve`` blocks parsed into frozen dataclasses.

The spec file is where users meet the compiler first, so every failure is a ``SpecError``
with file, line, column, the source line and a hint. Parsing has two stages: the lark grammar
(``spec.lark``) checks only the shape and returns words; the field tables below convert and
check each value, so type and enum errors point at the value and can list the valid choices.
Command-line overrides go through the same tables, so they fail with the same messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, cast

import lark

from ir.errors import Location, SpecError, did_you_mean
from passes import layouts as _layouts
from ir.model import BIAS_KINDS, BLOCK_KINDS, MLP_KINDS, NORM_KINDS, ROTARY_STYLES, ModelSpec
from ir.model import MAX_INT as _MAX_INT
from ir.model import MOE_FIELDS
from ir.model import MODEL_FIELDS as _MODEL_FIELDS
from ir.model import NAME_FIELD as _NAME_FIELD
from ir.model import WORD_RE as _WORD_RE
from ir.model import MICROBATCHES_RE as _MICROBATCHES_RE
from ir.model import Field as _Field
from ir.model import Invalid as _Invalid
from ir.model import check_fields as _check_fields
from ir.model import value_problem as _value_problem

__all__ = [
    "ATTN_LAYOUTS", "BIAS_KINDS", "BLOCK_KINDS", "FFN_LAYOUTS", "HARDWARE", "MLP_KINDS",
    "NORM_KINDS", "OVERLAPS", "KV_LAYOUTS", "PHASES", "ROTARY_STYLES", "WEIGHT_FORMATS",
    "MeshSpec", "ModelSpec", "ServeSpec", "Spec",
    "apply_overrides", "format_spec", "load_spec", "parse_spec",
]

BLOCKS = ("model", "mesh", "serve")
PHASES = ("prefill", "decode")
# the layouts themselves are passes/layouts.py's; a spec may also leave the choice to the cost model
FFN_LAYOUTS = (*_layouts.FFN_LAYOUTS, "auto")
ATTN_LAYOUTS = (*_layouts.ATTN_LAYOUTS, "auto")
KV_LAYOUTS = ("auto", "shard", "replicate", "pad")
LOGITS = ("last", "all")
WEIGHT_FORMATS = ("f32", "bf16", "int8")
OVERLAPS = ("none", "looped", "bidirectional")
HARDWARE = ("tpu-v4", "tpu-v5e", "tpu-v5p", "a100-80g", "h100", "h100-80g", "h200", "cpu")

COMMAND_LINE = "<command line>"

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


_SERVE_FIELDS: dict[str, _Field] = {
    "phase": _Field("enum", PHASES),
    "batch": _Field("int"),
    "seq": _Field("int"),
    "ffn": _Field("enum", FFN_LAYOUTS),
    "attn": _Field("enum", ATTN_LAYOUTS),
    "weights": _Field("enum", WEIGHT_FORMATS),
    "overlap": _Field("enum", OVERLAPS),
    "hardware": _Field("enum", HARDWARE),
    "kv": _Field("enum", KV_LAYOUTS),
    "logits": _Field("enum", LOGITS),
    "microbatches": _Field("microbatches"),
    "pad": _Field("bool"),
    "expert_axes": _Field("name"),
    "capacity_factor": _Field("name"),
}
_AXIS_SIZE = _Field("int")
_REQUIRED = tuple(k for k, f in _MODEL_FIELDS.items() if f.required)


@dataclass(frozen=True)
class MeshSpec:
    """Named device-mesh axes in order (major first); no axes means a single device."""

    axes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        try:
            axes = tuple((a, s) for a, s in self.axes)
        except (TypeError, ValueError):
            raise _Invalid(f"mesh axes must be (name, size) pairs, got {self.axes!r}", ()) from None
        object.__setattr__(self, "axes", axes)
        seen: set[str] = set()
        for a, s in axes:
            if not isinstance(a, str) or not _IDENT_RE.match(a):
                raise _Invalid(f"mesh axis name must be an identifier, got {a!r}", (a,) if isinstance(a, str) else ())
            if a in seen:
                raise _Invalid(f"duplicate mesh axis '{a}'", (a,))
            seen.add(a)
            problem = _value_problem(f"mesh axis {a}", _AXIS_SIZE, s)
            if problem:
                raise _Invalid(problem, (a,))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.axes)

    @property
    def n_devices(self) -> int:
        return math.prod(self.sizes)

    def size(self, name: str) -> int:
        """Size of axis ``name``; KeyError for an axis the mesh lacks (silently 1 hides typos)."""
        for a, s in self.axes:
            if a == name:
                return s
        raise KeyError(f"mesh has no axis '{name}' (axes: {', '.join(self.names) or 'none'})")


@dataclass(frozen=True)
class ServeSpec:
    """How the model is served: phase, shapes, layouts, weight format and target hardware."""

    phase: str = "prefill"  # prefill | decode
    batch: int = 1
    seq: int = 128  # prefill: tokens per sequence; decode: KV cache length
    ffn: str = "1d-ws"  # FFN layout: weight-stationary 1D/2D, weight-gathered over x/xy/xyz, or auto
    attn: str = "heads"  # attention sharded over heads or (for multiquery) batch, or auto
    weights: str = "f32"  # weight storage format
    overlap: str = "none"  # collective/einsum overlap: none | looped | bidirectional
    hardware: str = "cpu"  # target for the cost model
    kv: str = "auto"  # grouped-query heads: shard K (then G), replicate K/V, pad, or auto (cost model)
    logits: str = "last"  # prefill logits: the last prompt position (serving) or all (scoring)
    pad: bool = True  # zero-pad heads, vocabulary, d_ff, d_model and batch that do not divide the layout
    microbatches: str = "auto"  # pipeline stages (mesh axis stage): PREFILL:DECODE counts, or auto
    #: Mixture of experts: mesh axes sharding the experts (x+y; x,y on the command line), auto
    #: (the longest prefix of the mesh axes whose devices divide the experts) or none.
    expert_axes: str = "auto"
    #: Mixture of experts: slots per expert for each sequence, ``dropless`` (every token fits) or a
    #: capacity factor (1.25: 1.25 x the sequence's tokens x top_k / experts; the weakest
    #: assignments beyond it are dropped, and counted by `einshard run`).
    capacity_factor: str = "dropless"

    def __post_init__(self) -> None:
        _check_fields(self, _SERVE_FIELDS)
        cf = self.capacity_factor
        if cf != "dropless" and not (_FLOAT_RE.match(cf) and float(cf) > 0):
            raise _Invalid(f"capacity_factor must be dropless or a positive number, got {cf!r}", ("capacity_factor",),
                           "e.g. capacity_factor = 1.25 (slots per expert: 1.25 x tokens x top_k / experts)")

    @property
    def moe_capacity(self) -> float:
        """The capacity factor as a number; 0.0 for dropless dispatch."""
        return 0.0 if self.capacity_factor == "dropless" else float(self.capacity_factor)


@dataclass(frozen=True)
class Spec:
    """A whole spec file; ``path`` is where it came from, for messages only."""

    model: ModelSpec
    mesh: MeshSpec = field(default_factory=MeshSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    path: str = "<spec>"


# ---------------------------------------------------------------------------------------------
# Locations and value conversion (shared by files and command-line overrides)


class _Source:
    """Builds Locations in one text; lines split on '\\n' only, exactly as lark counts them."""

    def __init__(self, text: str, file: str):
        self.lines = text.split("\n")
        self.file = file

    def loc(self, line: int, col: int, length: int = 1) -> Location:
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        if src is not None and not src.strip():
            src = None  # a caret under a blank line shows nothing
        if src is not None:
            # Keep one character per column so the caret lines up; hide control characters.
            src = "".join(" " if c == "\t" else "?" if ord(c) < 32 or ord(c) == 127 else c
                          for c in src.rstrip("\r"))
        return Location(self.file, max(1, line), max(1, col), src, max(1, length))

    def at(self, tok: lark.Token) -> Location:
        return self.loc(tok.line or 1, tok.column or 1, len(tok))


def _convert(name: str, f: _Field, text: str, loc: Location) -> Any:
    """Parses one written value of field ``name``; errors point at ``loc``."""
    if f.kind in ("int", "count"):
        if not _INT_RE.match(text):
            raise SpecError(f"{name} must be an integer, got '{text}'", loc, "write a whole number such as 2 or 4096")
        if len(text.lstrip("+-0")) > 19 or int(text) > _MAX_INT:
            raise SpecError(f"{name} is too large: {text}", loc, f"the largest accepted value is {_MAX_INT}")
        value = int(text)
        if value < (1 if f.kind == "int" else 0):
            raise SpecError(f"{name} must be {'positive' if f.kind == 'int' else 'zero or positive'}, got {text}", loc)
        return value
    if f.kind == "float":
        if not _FLOAT_RE.match(text):
            raise SpecError(f"{name} must be a number, got '{text}'", loc, "write a number such as 1e-5 or 10000.0")
        number = float(text)
        if not math.isfinite(number):
            raise SpecError(f"{name} is out of range: {text}", loc)
        if number <= 0:
            raise SpecError(f"{name} must be positive, got {text}", loc)
        return number
    if f.kind == "bool":
        if text not in ("true", "false"):
            raise SpecError(f"{name} must be true or false, got '{text}'", loc, did_you_mean(text, ("true", "false")))
        return text == "true"
    if f.kind == "enum":
        if text not in f.choices:
            raise SpecError(f"invalid value '{text}' for {name}", loc, did_you_mean(text, f.choices))
        return text
    if f.kind == "microbatches":
        problem = _value_problem(name, f, text)
        if problem:
            raise SpecError(problem, loc, "e.g. serve.microbatches = 8:4 (prefill 8, decode 4) or auto")
        return text
    return text  # name: the WORD token already restricts the characters


# ---------------------------------------------------------------------------------------------
# Drafts: field values with the place they were written, before the dataclasses are built


@dataclass
class _Val:
    value: Any
    loc: Location | None  # where the value was written; None when carried over from a Spec


@dataclass
class _Draft:
    """Section → field → value; ``model_loc`` anchors errors about the model block as a whole."""

    model: dict[str, _Val] = field(default_factory=dict)
    mesh: dict[str, _Val] = field(default_factory=dict)
    serve: dict[str, _Val] = field(default_factory=dict)
    model_loc: Location | None = None

    @classmethod
    def of(cls, spec: Spec) -> _Draft:
        m = spec.model
        model = {f.name: _Val(getattr(m, f.name), None) for f in fields(m)}
        if m.rotary_dim == m.d_head:
            del model["rotary_dim"]  # a full-width rotary_dim follows d_head when d_head is overridden
        return cls(model=model,
                   mesh={a: _Val(s, None) for a, s in spec.mesh.axes},
                   serve={f.name: _Val(getattr(spec.serve, f.name), None) for f in fields(spec.serve)})

    def build(self, path: str, fallback: Location) -> Spec:
        """Builds the dataclasses; their own checks are re-raised at the culprit's location."""
        anchor = self.model_loc or fallback
        missing = [k for k in _REQUIRED if k not in self.model]
        if missing:
            s = "s" if len(missing) > 1 else ""
            raise SpecError(f"model block is missing required field{s}: {', '.join(missing)}", anchor,
                            f"add one line per field, e.g. '{missing[0]} = ...'; required: {', '.join(_REQUIRED)}")
        model = _make(ModelSpec, self.model, anchor)
        mesh = MeshSpec(tuple((a, v.value) for a, v in self.mesh.items()))
        serve = _make(ServeSpec, self.serve, fallback)
        return Spec(model, mesh, serve, path)


def _make(cls: Any, vals: dict[str, _Val], fallback: Location) -> Any:
    try:
        return cls(**{k: v.value for k, v in vals.items()})
    except _Invalid as e:
        locs = [vals[f].loc for f in e.fields if f in vals and vals[f].loc is not None]
        raise SpecError(e.message, locs[0] if locs else fallback, e.hint) from None


def _set_field(draft: _Draft, section: str, key: str, text: str, key_loc: Location, val_loc: Location,
               first: dict[tuple[str, str], Location] | None = None) -> None:
    """Checks and stores one ``key = value``; ``first`` (files only) rejects repeated fields."""
    if section == "mesh":
        if not _IDENT_RE.match(key):
            raise SpecError(f"mesh axis name '{key}' is not an identifier", key_loc,
                            "axis names start with a letter or '_' and go on with letters, digits or '_'")
        what, f, store = f"duplicate mesh axis '{key}'", _AXIS_SIZE, draft.mesh
        name = f"mesh axis {key}"
    else:
        table = _MODEL_FIELDS if section == "model" else _SERVE_FIELDS
        store = draft.model if section == "model" else draft.serve
        if key == "name" and section == "model" and first is None:
            f = _NAME_FIELD  # overrides may rename the model; files put the name in the header
        elif key not in table:
            hint = did_you_mean(key, tuple(table))
            if key == "name" and section == "model":
                hint = "the model's name goes in the block header: model NAME { ... }"
            raise SpecError(f"unknown field '{key}' in {section} block", key_loc, hint)
        else:
            f = table[key]
        what, name = f"duplicate field '{key}' in {section} block", key
    if first is not None:
        if (section, key) in first:
            prev = first[section, key]
            where = f"column {prev.col}" if prev.file == COMMAND_LINE else f"line {prev.line}"
            raise SpecError(what, key_loc, f"it was already set at {where}; keep one")
        first[section, key] = key_loc
    if f.kind == "name" and not _WORD_RE.match(text):
        raise SpecError(f"invalid model name '{text}'", val_loc, "names use letters, digits, '_', '-', '.' and '+'")
    store[key] = _Val(_convert(name, f, text, val_loc), val_loc)


# ---------------------------------------------------------------------------------------------
# Files


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = Path(__file__).with_name("spec.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True)


_TOKEN_WORDS = {"EQUAL": "'='", "LBRACE": "'{'", "RBRACE": "'}'", "_NL": "end of line", "$END": "end of file"}


def _expected(exp: set[str]) -> str:
    """Plain words for lark's expected-terminal set; WORD's meaning depends on the parser state."""
    words = []
    if "WORD" in exp:
        if exp == {"WORD"}:
            words.append("a value")
        elif "RBRACE" in exp:
            words.append("a field name")
        elif "LBRACE" in exp:
            words.append("a model name")
        else:
            words.append("a block ('model NAME {', 'mesh {' or 'serve {')")
    words += [_TOKEN_WORDS[t] for t in ("EQUAL", "LBRACE", "RBRACE") if t in exp]
    if "_NL" in exp and "WORD" not in exp:
        words.insert(0, "end of line")
    return " or ".join(words) or "something else"


def _open_brace_line(text: str) -> int:
    """Line of the innermost '{' still open at the end of ``text`` (comments skipped)."""
    stack: list[int] = []
    for n, line in enumerate(text.split("\n"), 1):
        for c in line.split("#", 1)[0]:
            if c == "{":
                stack.append(n)
            elif c == "}" and stack:
                stack.pop()
    return stack[-1] if stack else 1


def _syntax_error(e: lark.UnexpectedInput, text: str, src: _Source) -> SpecError:
    exp = set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())
    line, col, length = getattr(e, "line", -1), getattr(e, "column", -1), 1
    tok = getattr(e, "token", None)
    hint: str | None = None
    if isinstance(e, lark.UnexpectedCharacters):
        pos = e.pos_in_stream or 0
        c = text[pos] if 0 <= pos < len(text) else ""
        found = f"character '{c}'" if c.isprintable() and c.strip() else f"character U+{ord(c or ' '):04X}"
        if c in "\"'":
            hint = "values are written without quotes"
        elif c == ":":
            hint = "fields are written 'name = value'"
    elif tok is not None and tok.type == "$END" or isinstance(e, lark.UnexpectedEOF):
        found = "end of file"
        stripped = text.rstrip()
        line = stripped.count("\n") + 1
        col = len(stripped) - (stripped.rfind("\n") + 1) + 1
        if "RBRACE" in exp:
            hint = f"the block opened at line {_open_brace_line(text)} has no closing '}}'"
    elif tok is not None:
        found = f"'{tok}'" if tok.type == "WORD" else _TOKEN_WORDS.get(tok.type, f"'{tok}'")
        length = len(tok) if tok.type == "WORD" else 1
        if tok.type == "LBRACE" and "EQUAL" in exp:
            hint = "blocks cannot be nested; close the enclosing block with '}' first"
        elif tok.type == "_NL" and exp == {"WORD"}:
            hint = "give a value after '='"
        elif tok.type == "EQUAL" and "LBRACE" in exp:
            hint = "fields go inside a block: model NAME { ... }, mesh { ... } or serve { ... }"
        elif tok.type == "RBRACE" and "RBRACE" not in exp:
            hint = "this '}' closes no block"
        elif "EQUAL" in exp:
            hint = "fields are written 'name = value'"
    else:
        found = "input"
    if line < 1 or col < 1:
        line, col = 1, 1
    return SpecError(f"unexpected {found}; expected {_expected(exp)}", src.loc(line, col, length), hint)


_Block = tuple[lark.Token, lark.Token | None, list[tuple[lark.Token, lark.Token]]]


def _blocks(tree: lark.Tree[lark.Token]) -> list[_Block]:
    """(head, name or None, [(key, value)]) per block, in file order."""
    out: list[_Block] = []
    for block in tree.children:
        assert isinstance(block, lark.Tree)
        head, name, *rest = block.children
        assert isinstance(head, lark.Token) and (name is None or isinstance(name, lark.Token))
        items = [cast(tuple[lark.Token, lark.Token], tuple(f.children)) for f in rest if isinstance(f, lark.Tree)]
        out.append((head, name, items))
    return out


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    """Parses spec text; any problem is a SpecError located in ``text``."""
    src = _Source(text, path)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedInput as e:
        raise _syntax_error(e, text, src) from None
    except lark.LarkError as e:  # pragma: no cover - the grammar leaves no other failure
        raise SpecError(f"cannot parse spec: {e}", src.loc(1, 1)) from None
    draft = _Draft()
    blocks: dict[str, lark.Token] = {}
    first: dict[tuple[str, str], Location] = {}
    for head, name, items in _blocks(tree):
        kind = str(head)
        if kind not in BLOCKS:
            raise SpecError(f"unknown block '{kind}'", src.at(head), did_you_mean(kind, BLOCKS))
        if kind in blocks:
            raise SpecError(f"duplicate {kind} block", src.at(head),
                            f"the {kind} block was already given at line {blocks[kind].line}; merge the two")
        blocks[kind] = head
        if kind == "model":
            if name is None:
                raise SpecError("the model block needs a name", src.at(head), "write 'model NAME {', e.g. 'model tiny {'")
            draft.model_loc = src.at(head)
            draft.model["name"] = _Val(str(name), src.at(name))
        elif name is not None:
            raise SpecError(f"the {kind} block takes no name", src.at(name), f"write '{kind} {{'")
        for key, value in items:
            _set_field(draft, kind, str(key), str(value), src.at(key), src.at(value), first)
    if "model" not in blocks:
        raise SpecError("no model block", src.loc(1, 1),
                        f"a spec needs 'model NAME {{ ... }}' setting at least {', '.join(_REQUIRED)}")
    return draft.build(path, src.loc(1, 1))


def load_spec(path: str | Path) -> Spec:
    """Reads and parses a spec file; an unreadable file is a SpecError without a location."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file '{path}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file '{path}': {e.strerror or e}") from None
    return parse_spec(text, str(path))


# ---------------------------------------------------------------------------------------------
# Command-line overrides


def _cli_loc(text: str, start: int, length: int) -> Location:
    """A location in one override's text (0-based ``start``)."""
    return _Source(text, COMMAND_LINE).loc(1, start + 1, length)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrinks [start, end) to exclude surrounding blanks."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _checked_word(text: str, start: int, end: int, what: str) -> str:
    """The stripped word text[start:end], or a SpecError saying it is empty or malformed."""
    start, end = _strip_span(text, start, end)
    word = text[start:end]
    if not word:
        raise SpecError(f"missing {what}", _cli_loc(text, start, 1))
    if not _WORD_RE.match(word) and not _MICROBATCHES_RE.match(word):
        raise SpecError(f"malformed {what}: '{word}'", _cli_loc(text, start, end - start),
                        "names and values use letters, digits, '_', '-', '.' and '+'")
    return word


def _mesh_override(text: str) -> dict[str, _Val]:
    """Parses ``x=2,y=2,z=2`` (``''`` or ``'1'``: one device) into mesh draft entries."""
    if text.strip() in ("", "1"):
        return {}
    draft = _Draft()
    first: dict[tuple[str, str], Location] = {}
    pos = 0
    for item in text.split(","):
        start, end = _strip_span(text, pos, pos + len(item))
        pos += len(item) + 1
        if "=" not in item:
            raise SpecError(f"mesh axes are written NAME=SIZE, got '{text[start:end]}'",
                            _cli_loc(text, start, end - start), "e.g. --mesh x=2,y=2,z=2")
        eq = text.index("=", start)
        key = _checked_word(text, start, eq, "mesh axis name")
        value = _checked_word(text, eq + 1, end, f"size of mesh axis '{key}'")
        ks = _strip_span(text, start, eq)[0]
        vs = _strip_span(text, eq + 1, end)[0]
        _set_field(draft, "mesh", key, value, _cli_loc(text, ks, len(key)), _cli_loc(text, vs, len(value)), first)
    return draft.mesh


def _set_override(draft: _Draft, text: str) -> None:
    """Applies one ``section.field=value`` override."""
    if "=" not in text:
        raise SpecError(f"overrides are written SECTION.FIELD=VALUE, got '{text.strip()}'",
                        _cli_loc(text, 0, len(text)), "e.g. --set serve.batch=8")
    eq = text.index("=")
    kstart, kend = _strip_span(text, 0, eq)
    path = text[kstart:kend]
    if "." not in path:
        owners = [s for s, t in (("model", _MODEL_FIELDS), ("serve", _SERVE_FIELDS)) if path in t]
        hint = f"did you mean '{owners[0]}.{path}'?" if owners else "sections: model, mesh, serve"
        raise SpecError(f"overrides are written SECTION.FIELD=VALUE, got '{path}'",
                        _cli_loc(text, kstart, max(1, kend - kstart)), hint)
    dot = text.index(".", kstart)
    section = _checked_word(text, kstart, dot, "section")
    if section not in BLOCKS:
        raise SpecError(f"unknown section '{section}'", _cli_loc(text, kstart, max(1, dot - kstart)),
                        did_you_mean(section, BLOCKS))
    key = _checked_word(text, dot + 1, kend, "field name")
    if key == "expert_axes":  # x,y reads better on a command line; the spec language writes x+y
        text = text[: eq + 1] + text[eq + 1:].replace(",", "+")
    value = _checked_word(text, eq + 1, len(text), f"value for {section}.{key}")
    ks, vs = _strip_span(text, dot + 1, kend)[0], _strip_span(text, eq + 1, len(text))[0]
    _set_field(draft, section, key, value, _cli_loc(text, ks, len(key)), _cli_loc(text, vs, len(value)))


def apply_overrides(spec: Spec, *, mesh: str | None = None, phase: str | None = None,
                    batch: int | str | None = None, seq: int | str | None = None, ffn: str | None = None,
                    attn: str | None = None, weights: str | None = None, overlap: str | None = None,
                    sets: Sequence[str] = ()) -> Spec:
    """Applies CLI overrides in order --mesh, the serve flags, then each --set.

    Values are checked exactly like file values; errors point into the override's own text
    (``--set``/``--mesh`` text as given, flags as ``phase=VALUE``) at file ``<command line>``.
    A rotary_dim equal to d_head follows d_head when d_head is overridden.
    """
    draft = _Draft.of(spec)
    if mesh is not None:
        draft.mesh = _mesh_override(str(mesh))
    flags = {"phase": phase, "batch": batch, "seq": seq, "ffn": ffn, "attn": attn,
             "weights": weights, "overlap": overlap}
    for key, value in flags.items():
        if value is not None:
            text = f"{key}={value}"
            word = _checked_word(text, len(key) + 1, len(text), f"value for {key}")
            vs = _strip_span(text, len(key) + 1, len(text))[0]
            loc = _cli_loc(text, vs, len(word))
            draft.serve[key] = _Val(_convert(key, _SERVE_FIELDS[key], word, loc), loc)
    for s in sets:
        _set_override(draft, str(s))
    return draft.build(spec.path, Location(COMMAND_LINE, 1, 1))


# ---------------------------------------------------------------------------------------------
# Printing


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _fmt_block(head: str, items: list[tuple[str, Any]]) -> list[str]:
    width = max((len(k) for k, _ in items), default=0)
    return [f"{head} {{", *(f"  {k.ljust(width)} = {_fmt(v)}" for k, v in items), "}"]


#: Model fields left out of the canonical text while off (they parse back to the same default).
_OFF = {"sliding_window": 0, "qk_norm": "none"}


def format_spec(spec: Spec) -> str:
    """Canonical text with every field spelled out; ``parse_spec`` gives the same Spec back."""
    m = spec.model
    out = _fmt_block(f"model {m.name}", [(k, getattr(m, k)) for k in _MODEL_FIELDS
                                         if not (k in _OFF and getattr(m, k) == _OFF[k])
                                         and not (k in MOE_FIELDS and not m.experts)])
    if spec.mesh.axes:
        out += ["", *_fmt_block("mesh", list(spec.mesh.axes))]
    # micro-batches mean something only with pipeline stages (a mesh axis named stage)
    staged = "stage" in spec.mesh.names or spec.serve.microbatches != "auto"
    # and expert axes only with experts
    moe = m.experts > 0 or spec.serve.expert_axes != "auto" or spec.serve.capacity_factor != "dropless"
    out += ["", *_fmt_block("serve", [(k, getattr(spec.serve, k)) for k in _SERVE_FIELDS
                                      if (k != "microbatches" or staged)
                                      and (k not in ("expert_axes", "capacity_factor") or moe)])]
    return "\n".join(out) + "\n"
