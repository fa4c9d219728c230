"""The model description every layer shares: ``ModelSpec`` and the field tables that check it.

It lives in ``ir`` (below passes, compiler and runtime) because the runtime's checkpoint and
tokenizer loaders must build and compare ModelSpecs without importing the compiler; the spec
language (``compiler.spec``) parses text into it with the same tables, so a field is checked
the same way whether it comes from a spec file, an override or a checkpoint.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ir.errors import SpecError

__all__ = [
    "BIAS_KINDS", "BLOCK_KINDS", "MLP_KINDS", "NORM_KINDS", "ROTARY_STYLES", "MODEL_FIELDS", "MAX_INT",
    "Field", "Invalid", "ModelSpec", "check_fields", "value_problem",
]

BLOCK_KINDS = ("parallel", "serial")
MLP_KINDS = ("swiglu", "gelu", "gelu-tanh")
NORM_KINDS = ("layernorm", "rmsnorm")
ROTARY_STYLES = ("half", "interleaved")
BIAS_KINDS = ("none", "mlp", "all", "qkv")

MAX_INT = 2**62  # far beyond any real size; keeps later arithmetic in machine integers
WORD_RE = re.compile(r"[A-Za-z0-9_.+\-]+\Z")


@dataclass(frozen=True)
class Field:
    """How one field's value is written and checked: int (> 0), count (>= 0), float, bool, enum or name."""

    kind: str
    choices: tuple[str, ...] = ()
    required: bool = False


MODEL_FIELDS: dict[str, Field] = {
    "layers": Field("int", required=True),
    "d_model": Field("int", required=True),
    "heads": Field("int", required=True),
    "kv_heads": Field("int", required=True),
    "d_head": Field("int", required=True),
    "d_ff": Field("int", required=True),
    "vocab": Field("int", required=True),
    "block": Field("enum", BLOCK_KINDS),
    "mlp": Field("enum", MLP_KINDS),
    "norm": Field("enum", NORM_KINDS),
    "norm_eps": Field("float"),
    "rope_theta": Field("float"),
    "rotary_dim": Field("int"),
    "rotary_style": Field("enum", ROTARY_STYLES),
    "bias": Field("enum", BIAS_KINDS),
    "tie_embeddings": Field("bool"),
    "sliding_window": Field("count"),
}
NAME_FIELD = Field("name")


class Invalid(SpecError):
    """Raised by the dataclasses' own checks; ``fields`` lets the parser point at a culprit."""

    def __init__(self, message: str, fields_: tuple[str, ...], hint: str | None = None):
        super().__init__(message, None, hint)
        self.fields = fields_


def value_problem(name: str, f: Field, value: Any) -> str | None:
    """Why ``value`` is not a valid already-converted value of field ``name`` (None if it is)."""
    if f.kind in ("int", "count"):
        low = 1 if f.kind == "int" else 0
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT
        what = "a positive" if f.kind == "int" else "a non-negative"
        return None if ok else f"{name} must be {what} integer, got {value!r}"
    if f.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            ok = ok and math.isfinite(float(value)) and value > 0
        except OverflowError:  # an int beyond float range
            ok = False
        return None if ok else f"{name} must be a positive number, got {value!r}"
    if f.kind == "bool":
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if f.kind == "enum":
        return None if value in f.choices else f"{name} must be one of {', '.join(f.choices)}, got {value!r}"
    ok = isinstance(value, str) and WORD_RE.match(value) is not None
    return None if ok else f"{name} must be a word of letters, digits, '_', '-', '.' or '+', got {value!r}"


def check_fields(obj: Any, table: dict[str, Field]) -> None:
    """Validates every table field of a spec dataclass; coerces int floats to float."""
    for name, f in table.items():
        value = getattr(obj, name)
        problem = value_problem(name, f, value)
        if problem:
            raise Invalid(problem, (name,))
        if f.kind == "float":
            object.__setattr__(obj, name, float(value))


def divisors(n: int) -> str:
    ds = [d for d in range(1, min(n, 4096) + 1) if n % d == 0]
    return ", ".join(map(str, ds[:16])) + (", ..." if len(ds) > 16 else "")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. Construction validates it, so every ModelSpec is usable."""

    name: str
    layers: int
    d_model: int
    heads: int  # query heads
    kv_heads: int  # key/value heads; divides heads
    d_head: int
    d_ff: int
    vocab: int
    block: str = "serial"  # parallel: attention and MLP read the same normed input (PaLM, GPT-J)
    mlp: str = "gelu"  # swiglu | gelu (exact erf, Falcon) | gelu-tanh (GPT-J's gelu_new)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # dims of each head that RoPE rotates; 0 means d_head, resolved on construction
    rotary_style: str = "half"  # half: rotate_half pairs (i, i + r/2) | interleaved: pairs (2i, 2i + 1)
    bias: str = "none"  # none | mlp (MLP linears and lm_head) | all (every linear layer) | qkv (q/k/v only, Qwen2)
    tie_embeddings: bool = False  # output projection reuses the input embedding
    sliding_window: int = 0  # attend to the last sliding_window positions only (Mistral); 0: no window

    def __post_init__(self) -> None:
        problem = value_problem("name", NAME_FIELD, self.name)
        if problem:
            raise Invalid(problem, ("name",))
        defaulted = isinstance(self.rotary_dim, int) and not isinstance(self.rotary_dim, bool) and self.rotary_dim == 0
        if defaulted:
            object.__setattr__(self, "rotary_dim", self.d_head)
        check_fields(self, MODEL_FIELDS)
        if self.heads % self.kv_heads:
            raise Invalid(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})",
                ("kv_heads", "heads"),
                f"each K/V head serves heads/kv_heads query heads; kv_heads can be {divisors(self.heads)}",
            )
        culprit = ("d_head", "rotary_dim") if defaulted else ("rotary_dim", "d_head")
        if self.rotary_dim % 2:
            why = " (it defaults to d_head)" if defaulted else ""
            raise Invalid(f"rotary_dim must be even, got {self.rotary_dim}{why}", culprit,
                          "rotary embeddings rotate pairs of dimensions")
        if self.rotary_dim > self.d_head:
            raise Invalid(f"rotary_dim ({self.rotary_dim}) exceeds d_head ({self.d_head})", culprit,
                          "rotary_dim is how many of each head's d_head dimensions are rotated")

    @property
    def attention(self) -> str:
        """``multihead``, ``multiquery`` or ``grouped``: which K/V sharing scheme the heads use."""
        if self.kv_heads == self.heads:
            return "multihead"
        return "multiquery" if self.kv_heads == 1 else "grouped"

    @property
    def group_size(self) -> int:
        """Query heads per K/V head."""
        return self.heads // self.kv_heads

