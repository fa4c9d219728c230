"""Hugging Face ``config.json`` → einshard ``ModelSpec`` for the Llama, Mistral, Qwen2, Falcon and GPT-J families.

It lives in the runtime (the checkpoint loader needs it, and runtime must not import the
compiler); ``compiler.hf`` re-exports it and adds ``spec_from_hf``.

Why a separate reader (and not ``transformers.AutoConfig``): the compiler must not depend on
transformers or torch, and a checkpoint that einshard cannot represent exactly must be refused
with a ``SpecError`` naming the config field, never silently approximated. Absent keys take the
defaults of the corresponding transformers 5.x config class, so a minimal config means what it
means to transformers; the structural sizes (layers, widths, heads, vocab) are required.

Family notes (each mapping mirrors what the transformers module computes, not what the config
field names suggest):

- Llama: RMSNorm, SwiGLU (``hidden_act`` silu), rotate-half rotary over the whole head.
  ``num_key_value_heads`` gives multihead, multiquery (1) or grouped attention. ``attention_bias``
  and ``mlp_bias`` both true → bias ``all``, ``mlp_bias`` alone → ``mlp``; ``attention_bias`` alone
  has no einshard equivalent.
- Mistral: Llama's layer without biases, plus ``sliding_window`` (keys older than the window are
  masked; MistralConfig's default is 4096 when the key is absent, null means none).
- Qwen2: Llama's layer with biases on q, k and v only (bias ``qkv``); sliding windows on only some
  layers (``use_sliding_window`` with ``max_window_layers`` below the depth) are refused.
- Falcon: LayerNorm, exact GELU, rotate-half rotary. The old architecture with ``multi_query``
  uses ONE K/V head whatever ``num_kv_heads`` says; ``multi_query=false`` gives multihead;
  ``new_decoder_architecture`` with ``num_ln_in_parallel_attn=1`` gives grouped attention with
  ``num_kv_heads`` groups (two norms per layer, the default there, are not representable).
  ``parallel_attn`` picks the parallel or serial block. ``bias=true`` → bias ``all``.
- GPT-J: LayerNorm, parallel block, tanh-approximate GELU (``gelu_new``), interleaved rotary on
  the first ``rotary_dim`` dims with base 10000 (hard-wired in the module), biases on the MLP and
  ``lm_head`` only (bias ``mlp``).

Rotary settings are read from ``rope_parameters`` (transformers 5.x), ``rope_scaling`` or a
top-level ``rope_theta``, with transformers' precedence; any ``rope_type`` but ``default`` (linear,
dynamic, yarn, llama3, ...) and a ``partial_rotary_factor`` below 1 are refused.

Einshard's bias levels put a bias on ``lm_head`` whenever bias is not ``none``; families without
one (Llama, Falcon) get a zero ``lm_head_bias`` from the weight loader, which is exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ir.errors import Location, SpecError
from ir.model import ModelSpec

__all__ = ["FAMILIES", "HFConfig", "falcon_qkv_layout", "hf_family", "model_from_config", "read_hf_config"]

FAMILIES: dict[str, str] = {"llama": "llama", "falcon": "falcon", "gptj": "gptj", "mistral": "llama", "qwen2": "llama",
                            "mixtral": "mixtral", "qwen2_moe": "qwen_moe", "qwen3_moe": "qwen_moe", "olmoe": "qwen_moe"}
"""HF ``model_type`` → the einshard family whose tensor names it uses (``runtime.recipes``)."""

_EXACT_GELU = ("gelu", "gelu_python")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")
_SILU = ("silu", "swish")


class HFConfig:
    """A parsed ``config.json``: the dict, its path and text (to point errors at keys)."""

    def __init__(self, data: dict[str, Any], path: Path, text: str):
        self.data, self.path, self.text = data, path, text

    def loc(self, key: str) -> Location | None:
        """Where ``"key":`` is written in the file (first occurrence), for carets."""
        m = re.search(r'"' + re.escape(key) + r'"\s*:', self.text)
        if not m:
            return None
        line = self.text.count("\n", 0, m.start()) + 1
        col = m.start() - (self.text.rfind("\n", 0, m.start()) + 1) + 1
        src = self.text.split("\n")[line - 1]
        return Location(str(self.path), line, col, src, len(key) + 2)

    def error(self, key: str | None, message: str, hint: str | None = None) -> SpecError:
        loc = self.loc(key) if key else None
        where = "" if loc else f"{self.path}: "
        return SpecError(where + message, loc, hint)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def first_key(self, *keys: str) -> str | None:
        """The first of ``keys`` present with a non-null value."""
        return next((k for k in keys if self.has(k)), None)

    def get_int(self, *keys: str, default: int | None = None) -> int:
        """An integer field written under any of ``keys`` (aliases), else ``default``."""
        key = self.first_key(*keys)
        if key is None:
            if default is None:
                raise self.error(None, f"config.json lacks '{keys[0]}'")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.error(key, f"{key} must be a positive integer, got {v!r}")
        return v

    def get_float(self, key: str, default: float) -> float:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise self.error(key, f"{key} must be a positive number, got {v!r}")
        return float(v)

    def get_bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(key, f"{key} must be true or false, got {v!r}")
        return v

    def get_str(self, key: str, default: str) -> str:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.error(key, f"{key} must be a string, got {v!r}")
        return v

    def require(self, *groups: tuple[str, ...]) -> None:
        """Every group (aliases of one size) must be present; all missing ones are listed at once."""
        missing = [g[0] for g in groups if self.first_key(*g) is None]
        if missing:
            s = "s" if len(missing) > 1 else ""
            raise self.error(None, f"config.json lacks required field{s}: {', '.join(missing)}")


def _config_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.name == "config.json" or p.is_file() else p / "config.json"


def read_hf_config(path: str | Path) -> HFConfig:
    """Reads ``config.json`` from a checkpoint directory (or the file itself); SpecError on failure."""
    cp = _config_path(path)
    try:
        text = cp.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no config.json in '{cp.parent}'",
                        hint="point at a Hugging Face checkpoint directory (as written by save_pretrained)") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"'{cp}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SpecError(f"cannot read '{cp}': {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = text.split("\n")
        src = lines[e.lineno - 1] if 0 < e.lineno <= len(lines) else None
        other = cp.name != "config.json"  # e.g. a spec file given where a checkpoint goes
        raise SpecError(f"{cp.name if other else 'config.json'} is not valid JSON: {e.msg}",
                        Location(str(cp), e.lineno, e.colno, src),
                        hint="give a Hugging Face checkpoint directory, its config.json or a .gguf file"
                        if other else None) from None
    if not isinstance(data, dict):
        raise SpecError(f"{cp}: config.json must hold a JSON object, got {type(data).__name__}")
    return HFConfig(data, cp, text)


#: Mixture-of-experts families einshard cannot represent yet, with what each lacks (so the refusal
#: names the missing feature rather than just the model type).
UNSUPPORTED_MOE: dict[str, str] = {
    "deepseek_v3": "DeepSeek-V3's grouped routing (n_group / topk_group), its score-correction bias and "
                   "multi-head latent attention",
    "deepseek_v2": "DeepSeek-V2's grouped routing (n_group / topk_group) and multi-head latent attention",
    "gpt_oss": "gpt-oss's clamped SwiGLU with biased experts, attention sinks and alternating sliding windows",
}


def hf_family(cfg: HFConfig) -> str:
    """The einshard family of a config (``llama``, ``falcon``, ``gptj``, ``mixtral``, ``qwen2_moe``), or a SpecError."""
    mt = cfg.data.get("model_type")
    supported = ", ".join(FAMILIES)
    if mt is None:
        raise cfg.error(None, "config.json has no model_type", f"supported model types: {supported}")
    if isinstance(mt, str) and mt in UNSUPPORTED_MOE:
        raise cfg.error("model_type", f"model_type {mt!r} needs what einshard does not implement: "
                        f"{UNSUPPORTED_MOE[mt]}", f"supported model types: {supported}")
    if not isinstance(mt, str) or mt not in FAMILIES:
        raise cfg.error("model_type", f"unsupported model_type {mt!r}", f"supported model types: {supported}")
    return FAMILIES[mt]


def falcon_qkv_layout(cfg: HFConfig) -> str:
    """How Falcon's fused ``query_key_value`` rows are ordered, as FalconAttention splits them.

    ``multiquery``: [H query heads | K | V]; ``multihead``: per head [q | k | v];
    ``grouped``: per K/V group [G query heads | k | v] (new decoder architecture).
    """
    if cfg.get_bool("new_decoder_architecture", False):
        return "grouped"
    return "multiquery" if cfg.get_bool("multi_query", True) else "multihead"


def _rope_theta(cfg: HFConfig, default: float = 10000.0) -> float:
    """The rotary base from ``rope_parameters`` / ``rope_scaling`` / ``rope_theta``; only unscaled rope.

    transformers 5.x writes ``rope_parameters: {rope_type, rope_theta}``; older files write a
    top-level ``rope_theta`` and ``rope_scaling`` (null, or ``{type|rope_type, factor, ...}``).
    """
    # As PreTrainedConfig does: a non-null rope_scaling replaces rope_parameters entirely, and a
    # top-level rope_theta fills in a missing theta.
    key = cfg.first_key("rope_scaling", "rope_parameters")
    if key is not None:
        params = cfg.data[key]
        if not isinstance(params, dict):
            raise cfg.error(key, f"{key} must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise cfg.error(key, f"rope scaling type {kind!r} ({key}) is not supported",
                            "einshard implements plain rotary embeddings (rope_type 'default') only")
        if params.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise cfg.error(key, f"partial_rotary_factor {params['partial_rotary_factor']!r} is not supported")
        if params.get("rope_theta") is not None:
            v = params["rope_theta"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise cfg.error(key, f"rope_theta must be a positive number, got {v!r}")
            return float(v)
    if cfg.data.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise cfg.error("partial_rotary_factor", "partial_rotary_factor is not supported for this family")
    return cfg.get_float("rope_theta", default)


def _gelu_kind(cfg: HFConfig, key: str, default: str) -> str:
    act = cfg.get_str(key, default)
    if act in _EXACT_GELU:
        return "gelu"
    if act in _TANH_GELU:
        return "gelu-tanh"
    raise cfg.error(key, f"{key} {act!r} is not supported",
                    f"supported: {', '.join(_EXACT_GELU)} (exact GELU), {', '.join(_TANH_GELU)} (tanh GELU)")


def _heads_divide(cfg: HFConfig, hidden_key: str, heads_key: str, hidden: int, heads: int) -> int:
    if hidden % heads:
        raise cfg.error(heads_key, f"{hidden_key} ({hidden}) is not a multiple of {heads_key} ({heads})")
    return hidden // heads


def _llama(cfg: HFConfig) -> dict[str, Any]:
    cfg.require(("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",), ("intermediate_size",),
                ("vocab_size",))
    hidden, heads = cfg.get_int("hidden_size"), cfg.get_int("num_attention_heads")
    d_head = cfg.get_int("head_dim", default=0) or _heads_divide(cfg, "hidden_size", "num_attention_heads", hidden, heads)
    act = cfg.get_str("hidden_act", "silu")
    if act not in _SILU:
        raise cfg.error("hidden_act", f"hidden_act {act!r} is not supported for llama",
                        "einshard's gated MLP is SwiGLU (hidden_act silu)")
    attn_bias, mlp_bias = cfg.get_bool("attention_bias", False), cfg.get_bool("mlp_bias", False)
    if attn_bias and not mlp_bias:
        raise cfg.error("attention_bias", "attention_bias=true with mlp_bias=false cannot be represented",
                        "einshard's bias levels are none, mlp (MLP and lm_head) and all (attention too)")
    return dict(layers=cfg.get_int("num_hidden_layers"), d_model=hidden, heads=heads,
                kv_heads=cfg.get_int("num_key_value_heads", default=heads), d_head=d_head,
                d_ff=cfg.get_int("intermediate_size"), vocab=cfg.get_int("vocab_size"), block="serial", mlp="swiglu",
                norm="rmsnorm", norm_eps=cfg.get_float("rms_norm_eps", 1e-6), rope_theta=_rope_theta(cfg),
                rotary_dim=d_head, rotary_style="half",
                bias="all" if attn_bias else "mlp" if mlp_bias else "none",
                tie_embeddings=cfg.get_bool("tie_word_embeddings", False))


def _mistral(cfg: HFConfig) -> dict[str, Any]:
    """Llama's layer without biases, plus sliding-window attention (MistralConfig's default window
    is 4096 when the key is absent; null means no window)."""
    fields = _llama(cfg)
    if "sliding_window" not in cfg.data:
        window = 4096
    elif cfg.data["sliding_window"] is None:
        window = 0
    else:
        window = cfg.get_int("sliding_window")
    return {**fields, "sliding_window": window}


def _qwen2(cfg: HFConfig) -> dict[str, Any]:
    """Llama's layer with biases on q, k and v only (Qwen2Attention: o_proj and the MLP have none)."""
    fields = _llama(cfg)
    if cfg.get_bool("use_sliding_window", False) and cfg.data.get("sliding_window") is not None:
        layers = fields["layers"]
        if cfg.get_int("max_window_layers", default=28) < layers:
            raise cfg.error("use_sliding_window", "Qwen2 sliding-window attention on only some layers cannot be "
                            "represented", "einshard applies one attention window to every layer")
    return {**fields, "bias": "qkv"}


def _falcon(cfg: HFConfig) -> dict[str, Any]:
    cfg.require(("num_hidden_layers", "n_layer"), ("hidden_size", "n_embed"), ("num_attention_heads", "n_head"),
                ("vocab_size",))
    hk, nk = cfg.first_key("hidden_size", "n_embed") or "", cfg.first_key("num_attention_heads", "n_head") or ""
    hidden, heads = cfg.get_int(hk), cfg.get_int(nk)
    d_head = _heads_divide(cfg, hk, nk, hidden, heads)
    if cfg.get_bool("alibi", False):
        raise cfg.error("alibi", "ALiBi position biases (alibi=true) are not supported",
                        "einshard implements rotary position embeddings only")
    layout = falcon_qkv_layout(cfg)
    if layout == "grouped":
        n_ln = cfg.data.get("num_ln_in_parallel_attn")
        if n_ln is None or n_ln == 2:
            raise cfg.error("num_ln_in_parallel_attn" if n_ln else "new_decoder_architecture",
                            "Falcon's new decoder architecture with two layer norms per layer "
                            "(num_ln_in_parallel_attn 2, its default) cannot be represented",
                            "einshard's parallel block has one norm feeding attention and MLP")
        if n_ln != 1:
            raise cfg.error("num_ln_in_parallel_attn", f"num_ln_in_parallel_attn must be 1 or 2, got {n_ln!r}")
        if cfg.data.get("parallel_attn") is False:
            raise cfg.error("parallel_attn", "new_decoder_architecture with parallel_attn=false is not supported")
        kv_heads = cfg.get_int("num_kv_heads", "n_head_kv", default=heads)
        block = "parallel"
    else:
        kv_heads = 1 if layout == "multiquery" else heads
        block = "parallel" if cfg.get_bool("parallel_attn", True) else "serial"
    return dict(layers=cfg.get_int("num_hidden_layers", "n_layer"), d_model=hidden, heads=heads, kv_heads=kv_heads,
                d_head=d_head, d_ff=cfg.get_int("ffn_hidden_size", default=4 * hidden), vocab=cfg.get_int("vocab_size"),
                block=block, mlp=_gelu_kind(cfg, "activation", "gelu"), norm="layernorm",
                norm_eps=cfg.get_float("layer_norm_epsilon", 1e-5), rope_theta=_rope_theta(cfg), rotary_dim=d_head,
                rotary_style="half", bias="all" if cfg.get_bool("bias", False) else "none",
                tie_embeddings=cfg.get_bool("tie_word_embeddings", True))


def _gptj(cfg: HFConfig) -> dict[str, Any]:
    cfg.require(("n_layer",), ("n_embd",), ("n_head",), ("vocab_size",))
    hidden, heads = cfg.get_int("n_embd"), cfg.get_int("n_head")
    d_head = _heads_divide(cfg, "n_embd", "n_head", hidden, heads)
    if "rotary_dim" in cfg.data and cfg.data["rotary_dim"] is None:
        # GPTJAttention then builds its sin/cos tables over n_embd dims, which only fit one head.
        if heads != 1:
            raise cfg.error("rotary_dim", "rotary_dim null is only meaningful for n_head 1",
                            "set rotary_dim to the number of rotated dims per head")
        rotary_dim = d_head
    else:
        rotary_dim = cfg.get_int("rotary_dim", default=64)
    return dict(layers=cfg.get_int("n_layer"), d_model=hidden, heads=heads, kv_heads=heads, d_head=d_head,
                d_ff=cfg.get_int("n_inner", default=4 * hidden), vocab=cfg.get_int("vocab_size"), block="parallel",
                mlp=_gelu_kind(cfg, "activation_function", "gelu_new"), norm="layernorm",
                norm_eps=cfg.get_float("layer_norm_epsilon", 1e-5), rope_theta=10000.0, rotary_dim=rotary_dim,
                rotary_style="interleaved", bias="mlp", tie_embeddings=cfg.get_bool("tie_word_embeddings", False))


def _experts(cfg: HFConfig, key: str) -> dict[str, Any]:
    """The routed-expert fields shared by the MoE families (softmax over all experts, then top-k)."""
    experts = cfg.get_int(key, default=8)
    top_k = cfg.get_int("num_experts_per_tok", default=2)
    if top_k > experts:
        raise cfg.error("num_experts_per_tok", f"num_experts_per_tok ({top_k}) exceeds {key} ({experts})")
    return dict(experts=experts, top_k=top_k, router="softmax-topk")


def _mixtral(cfg: HFConfig) -> dict[str, Any]:
    """Llama's attention, every MLP a mixture of SwiGLU experts; MixtralTopKRouter always
    renormalises the top-k weights. MixtralConfig's window defaults to none."""
    fields = _llama(cfg)
    window = cfg.get_int("sliding_window") if cfg.has("sliding_window") else 0
    return {**fields, **_experts(cfg, "num_local_experts"), "norm_topk": True, "sliding_window": window}


def _qwen2_moe(cfg: HFConfig) -> dict[str, Any]:
    """Qwen2's attention (q/k/v biases when qkv_bias, its default), every MLP sparse: routed experts of
    moe_intermediate_size, renormalised only with norm_topk_prob, plus one shared expert of
    shared_expert_intermediate_size scaled by sigmoid(shared_expert_gate)."""
    fields = _qwen2(cfg)
    _sparse_every_layer(cfg, "Qwen2-MoE")
    return {**fields, **_experts(cfg, "num_experts"), "bias": "qkv" if cfg.get_bool("qkv_bias", True) else "none",
            "d_ff": cfg.get_int("shared_expert_intermediate_size", default=5632),
            "expert_d_ff": cfg.get_int("moe_intermediate_size", default=1408),
            "norm_topk": cfg.get_bool("norm_topk_prob", False), "shared_experts": 1, "shared_gate": True}


def _sparse_every_layer(cfg: HFConfig, what: str) -> None:
    if cfg.data.get("mlp_only_layers") or cfg.get_int("decoder_sparse_step", default=1) != 1:
        key = "mlp_only_layers" if cfg.data.get("mlp_only_layers") else "decoder_sparse_step"
        raise cfg.error(key, f"{what} with dense MLPs on some layers cannot be represented",
                        "einshard applies one MLP kind (dense or mixture of experts) to every layer")


def _qwen3_moe(cfg: HFConfig) -> dict[str, Any]:
    """Llama's attention without biases plus an RMSNorm of each query and key head over D before
    rotary (q_norm / k_norm); every MLP sparse (experts of moe_intermediate_size, renormalised
    with norm_topk_prob), no shared expert."""
    fields = _qwen2(cfg)
    _sparse_every_layer(cfg, "Qwen3-MoE")
    return {**fields, **_experts(cfg, "num_experts" if cfg.has("num_experts") else "num_local_experts"),
            "bias": "none", "qk_norm": "head",
            "expert_d_ff": cfg.get_int("moe_intermediate_size", default=768),
            "norm_topk": cfg.get_bool("norm_topk_prob", False)}


def _olmoe(cfg: HFConfig) -> dict[str, Any]:
    """Llama's attention with an RMSNorm over the whole query (and key) projection before the
    split into heads (QK-norm over all heads), every MLP a mixture of intermediate_size experts
    renormalised with norm_topk_prob; clip_qkv (a clamp of q, k, v) is refused."""
    if cfg.data.get("clip_qkv") is not None:
        raise cfg.error("clip_qkv", "clip_qkv (clamping q, k and v) is not supported",
                        "einshard's attention has no clamp; only checkpoints with clip_qkv null load")
    fields = _llama(cfg)
    if fields["bias"] != "none":
        raise cfg.error("attention_bias", "OLMoE with attention biases is not supported")
    return {**fields, **_experts(cfg, "num_experts"), "qk_norm": "all",
            "expert_d_ff": fields["d_ff"], "norm_topk": cfg.get_bool("norm_topk_prob", False)}


_READERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "llama": _llama, "falcon": _falcon, "gptj": _gptj, "mistral": _mistral, "qwen2": _qwen2}
"""HF ``model_type`` → its config reader."""


def _model_name(cfg: HFConfig) -> str:
    """``_name_or_path``'s last component when written (a hub id names the model better than a
    snapshot hash directory), else the checkpoint directory's name; made a spec-legal word."""
    raw = cfg.data.get("_name_or_path")
    base = raw.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] if isinstance(raw, str) and raw.strip() else ""
    base = base or cfg.path.resolve().parent.name
    name = re.sub(r"[^A-Za-z0-9_.+\-]+", "-", base).strip("-")
    return name or "model"


def model_from_config(cfg: HFConfig) -> ModelSpec:
    """The ModelSpec a parsed config describes (SpecError when einshard cannot represent it)."""
    hf_family(cfg)  # an unsupported model_type is a SpecError pointing at it
    fields = _READERS[cfg.data["model_type"]](cfg)
    try:
        return ModelSpec(name=_model_name(cfg), **fields)
    except SpecError as e:
        raise SpecError(f"{cfg.path}: {e.message}", None, e.hint) from None
