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
    "BIAS_KINDS", "BLOCK_KINDS", "MLP_KINDS", "MOE_FIELDS", "ROUTER_KINDS", "NORM_KINDS", "ROTARY_STYLES", "MODEL_FIELDS", "MAX_INT",
    "Field", "Invalid", "ModelSpec", "check_fields", "value_problem",
]

BLOCK_KINDS = ("parallel", "serial")
MLP_KINDS = ("swiglu", "gelu", "gelu-tanh")
NORM_KINDS = ("layernorm", "rmsnorm")
ROTARY_STYLES = ("half", "interleaved")
#: How router logits become the k expert weights: softmax over all experts then top-k (Mixtral,
#: Qwen-MoE, OLMoE), top-k of the logits then softmax over the k, or sigmoid then top-k.
ROUTER_KINDS = ("softmax-topk", "topk-softmax", "sigmoid-topk")
#: RMSNorm of the queries and keys before rotary: none, per head over D (Qwen3), or over all
#: heads jointly (OLMoE: over the whole H*D projection).
QK_NORMS = ("none", "head", "all")
#: Fields that only mean something when ``experts`` > 0 (omitted from dense specs).
MOE_FIELDS = ("experts", "top_k", "router", "norm_topk", "expert_d_ff", "shared_experts", "shared_gate",
              "router_bias")
BIAS_KINDS = ("none", "mlp", "all", "qkv")

MAX_INT = 2**62  # far beyond any real size; keeps later arithmetic in machine integers
WORD_RE = re.compile(r"[A-Za-z0-9_.+\-]+\Z")
#: serve.microbatches written as PREFILL:DECODE (pipeline stages: DeepSpeed's hybrid schedule).
MICROBATCHES_RE = re.compile(r"[1-9][0-9]{0,5}:[1-9][0-9]{0,5}\Z")


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
    "qk_norm": Field("enum", QK_NORMS),
    "experts": Field("count"),
    "top_k": Field("count"),
    "router": Field("enum", ROUTER_KINDS),
    "norm_topk": Field("bool"),
    "expert_d_ff": Field("count"),
    "shared_experts": Field("count"),
    "shared_gate": Field("bool"),
    "router_bias": Field("bool"),
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
    if f.kind == "microbatches":
        ok = isinstance(value, str) and (value == "auto" or MICROBATCHES_RE.match(value) is not None)
        return None if ok else f"{name} must be auto or PREFILL:DECODE micro-batch counts such as 8:4, got {value!r}"
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
    qk_norm: str = "none"  # RMSNorm (eps norm_eps) of q and k before rotary: none | head (Qwen3) | all heads (OLMoE)
    # Mixture of experts (experts > 0): the MLP becomes a router over ``experts`` SwiGLU experts of
    # width expert_d_ff (0: d_ff), each token taking its ``top_k``; ``shared_experts`` > 0 adds an
    # always-on SwiGLU of width d_ff (Qwen2-MoE), scaled by sigmoid(gate . h) when shared_gate.
    experts: int = 0
    top_k: int = 0
    router: str = "softmax-topk"
    norm_topk: bool = False  # renormalise the k weights to sum to 1 (Mixtral always; Qwen/OLMoE by config)
    expert_d_ff: int = 0
    shared_experts: int = 0
    shared_gate: bool = False
    router_bias: bool = False  # a bias on the router logits

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
        self._check_moe()
        culprit = ("d_head", "rotary_dim") if defaulted else ("rotary_dim", "d_head")
        if self.rotary_dim % 2:
            why = " (it defaults to d_head)" if defaulted else ""
            raise Invalid(f"rotary_dim must be even, got {self.rotary_dim}{why}", culprit,
                          "rotary embeddings rotate pairs of dimensions")
        if self.rotary_dim > self.d_head:
            raise Invalid(f"rotary_dim ({self.rotary_dim}) exceeds d_head ({self.d_head})", culprit,
                          "rotary_dim is how many of each head's d_head dimensions are rotated")

    def _check_moe(self) -> None:
        if not self.experts:
            if self.top_k or self.shared_experts or self.expert_d_ff:
                raise Invalid("top_k, expert_d_ff and shared_experts need experts > 0", ("experts",),
                              "set experts to the number of routed experts, or leave the MoE fields out")
            return
        if self.expert_d_ff == 0:
            object.__setattr__(self, "expert_d_ff", self.d_ff)
        if not 1 <= self.top_k <= self.experts:
            raise Invalid(f"top_k must be between 1 and experts ({self.experts}), got {self.top_k}", ("top_k",),
                          "each token is routed to top_k of the experts")
        if self.mlp != "swiglu" or self.block != "serial":
            raise Invalid("mixture-of-experts layers are SwiGLU experts in a serial block", ("mlp", "block"),
                          "set mlp = swiglu and block = serial")
        if self.shared_gate and not self.shared_experts:
            raise Invalid("shared_gate needs shared_experts > 0", ("shared_gate",))

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts."""
        return self.experts > 0

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

