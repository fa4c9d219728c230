"""Checkpoint tensors → einshard weight arrays: per-family recipes and the one loader that applies them.

A checkpoint format (safetensors directory, GGUF file) only has to present its tensors under
Hugging Face names with HF shapes (``TensorInfo``, each with its own reader); ``assemble`` then

- maps them onto the einshard weight names of ``compiler.build`` (``layer_weights``,
  ``global_weights``): per-layer tensors are stacked along the leading N dim; torch ``Linear``
  weights, stored (out, in), are transposed to (in, out) and their head axis split into einshard's
  head letters (query head ``h`` becomes (k, g) with ``h = k*G + g``, as a row-major reshape of
  the HF (heads*d_head) axis gives); Falcon's fused ``query_key_value`` rows are split as
  FalconAttention splits them: ``[H query heads | K | V]`` (multiquery), per head ``[q | k | v]``
  (multihead), per K/V group ``[G query heads | k | v]`` (new decoder architecture);
- fails with ONE ``WeightsError`` listing every missing, mis-shaped or unreadable tensor, a layer
  beyond ``model.layers`` and every tensor the model does not use. An unused tensor means the
  model is not the one the file holds (a Qwen2 checkpoint relabelled ``llama`` would otherwise
  load and silently drop its q/k/v biases).

Tensors that are never weights are not "unused": rotary ``inv_freq`` / ``embed_positions``
buffers, GPT-J's old ``attn.bias``/``attn.masked_bias`` masks and, for tied embeddings, an
``lm_head.weight`` (transformers ties it to the embedding whatever the file holds).
Einshard's ``lm_head_bias`` exists whenever bias is ``mlp`` or ``all``; families without one are
given zeros (exact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping

import ml_dtypes
import numpy as np

from ir.errors import WeightsError
from ir.model import ModelSpec
from ir.types import TensorType

__all__ = ["RECIPE_FAMILIES", "TensorInfo", "assemble", "recipes_for"]


@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor as a family recipe sees it: HF name's shape and dtype, and how to read it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray] = field(compare=False, repr=False)


Convert = Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class _Recipe:
    """HF tensor names (``{i}`` = layer index) with their expected HF shapes, and the conversion
    of those arrays to one einshard weight (per layer when ``layered``; shape without N)."""

    sources: tuple[tuple[str, tuple[int, ...]], ...]
    convert: Convert
    layered: bool


def _linear(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """torch Linear (out, in) → einshard (in..., out...) with the out axis split into head letters."""
    return xs[0].T.reshape(shape)


def _same(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return xs[0].reshape(shape)


def _zeros(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _fused_rows(layout: str, H: int, K: int, D: int, part: str) -> Callable[[np.ndarray], np.ndarray]:
    """Selects the q, k or v rows of Falcon's fused query_key_value (weight or bias), head-major."""
    def pick(r: np.ndarray) -> np.ndarray:
        rest = r.shape[1:]
        if layout == "multiquery":
            lo, hi = {"q": (0, H * D), "k": (H * D, (H + 1) * D), "v": ((H + 1) * D, (H + 2) * D)}[part]
            return r[lo:hi]
        if layout == "multihead":
            r3 = r.reshape((H, 3, D) + rest)
            return r3[:, "qkv".index(part)].reshape((H * D,) + rest)
        G = H // K
        rg = r.reshape((K, G + 2, D) + rest)
        sel = rg[:, :G] if part == "q" else rg[:, G if part == "k" else G + 1]
        return sel.reshape((-1,) + rest)
    return pick


def _qkv_rows(layout: str, H: int, K: int, D: int) -> int:
    return {"multiquery": (H + 2) * D, "multihead": 3 * H * D}.get(layout, (H + 2 * K) * D)


def _llama_recipes(m: ModelSpec, layout: str) -> dict[str, _Recipe]:
    """Llama, Mistral and Qwen2 share these names; which biases exist is the model's ``bias``."""
    E, H, K, D, F, V = m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab
    L = "model.layers.{i}."
    r: dict[str, _Recipe] = {
        "embed": _Recipe((("model.embed_tokens.weight", (V, E)),), _same, False),
        "final_scale": _Recipe((("model.norm.weight", (E,)),), _same, False),
        "lm_head": _Recipe((("lm_head.weight", (V, E)),), _same, False),
        "lm_head_bias": _Recipe((), _zeros, False),
        "ln1_scale": _Recipe(((L + "input_layernorm.weight", (E,)),), _same, True),
        "ln2_scale": _Recipe(((L + "post_attention_layernorm.weight", (E,)),), _same, True),
    }
    for w, rows in (("q", H), ("k", K), ("v", K)):
        r["w" + w] = _Recipe(((L + f"self_attn.{w}_proj.weight", (rows * D, E)),), _linear, True)
        r["b" + w] = _Recipe(((L + f"self_attn.{w}_proj.bias", (rows * D,)),), _same, True)
    r["wo"] = _Recipe(((L + "self_attn.o_proj.weight", (E, H * D)),), _linear, True)
    r["bo"] = _Recipe(((L + "self_attn.o_proj.bias", (E,)),), _same, True)
    for n, (o, i) in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
        r["w_" + n] = _Recipe(((L + f"mlp.{n}_proj.weight", (o, i)),), _linear, True)
        r["b_" + n] = _Recipe(((L + f"mlp.{n}_proj.bias", (o,)),), _same, True)
    return r


def _falcon_recipes(m: ModelSpec, layout: str) -> dict[str, _Recipe]:
    E, H, K, D, F, V = m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab
    T, L = "transformer.", "transformer.h.{i}."
    qkv = L + "self_attention.query_key_value."
    rows = _qkv_rows(layout, H, K, D)
    r: dict[str, _Recipe] = {
        "embed": _Recipe(((T + "word_embeddings.weight", (V, E)),), _same, False),
        "final_scale": _Recipe(((T + "ln_f.weight", (E,)),), _same, False),
        "final_bias": _Recipe(((T + "ln_f.bias", (E,)),), _same, False),
        "lm_head": _Recipe((("lm_head.weight", (V, E)),), _same, False),
        "lm_head_bias": _Recipe((), _zeros, False),
        "wo": _Recipe(((L + "self_attention.dense.weight", (E, H * D)),), _linear, True),
        "bo": _Recipe(((L + "self_attention.dense.bias", (E,)),), _same, True),
        "w_in": _Recipe(((L + "mlp.dense_h_to_4h.weight", (F, E)),), _linear, True),
        "b_in": _Recipe(((L + "mlp.dense_h_to_4h.bias", (F,)),), _same, True),
        "w_out": _Recipe(((L + "mlp.dense_4h_to_h.weight", (E, F)),), _linear, True),
        "b_out": _Recipe(((L + "mlp.dense_4h_to_h.bias", (E,)),), _same, True),
    }
    norms = [("ln1", "input_layernorm")] + ([("ln2", "post_attention_layernorm")] if m.block == "serial" else [])
    for ours, theirs in norms:
        r[f"{ours}_scale"] = _Recipe(((L + f"{theirs}.weight", (E,)),), _same, True)
        r[f"{ours}_bias"] = _Recipe(((L + f"{theirs}.bias", (E,)),), _same, True)
    for part in "qkv":
        pick = _fused_rows(layout, H, K, D, part)

        def weight(xs: list[np.ndarray], s: tuple[int, ...], pick: Callable = pick) -> np.ndarray:
            return pick(xs[0]).T.reshape(s)

        def bias(xs: list[np.ndarray], s: tuple[int, ...], pick: Callable = pick) -> np.ndarray:
            return pick(xs[0]).reshape(s)

        r["w" + part] = _Recipe(((qkv + "weight", (rows, E)),), weight, True)
        r["b" + part] = _Recipe(((qkv + "bias", (rows,)),), bias, True)
    return r


def _gptj_recipes(m: ModelSpec, layout: str) -> dict[str, _Recipe]:
    E, H, K, D, F, V = m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab
    T, L = "transformer.", "transformer.h.{i}."
    r: dict[str, _Recipe] = {
        "embed": _Recipe(((T + "wte.weight", (V, E)),), _same, False),
        "final_scale": _Recipe(((T + "ln_f.weight", (E,)),), _same, False),
        "final_bias": _Recipe(((T + "ln_f.bias", (E,)),), _same, False),
        "lm_head": _Recipe((("lm_head.weight", (V, E)),), _same, False),
        "lm_head_bias": _Recipe((("lm_head.bias", (V,)),), _same, False),
        "ln1_scale": _Recipe(((L + "ln_1.weight", (E,)),), _same, True),
        "ln1_bias": _Recipe(((L + "ln_1.bias", (E,)),), _same, True),
        "wo": _Recipe(((L + "attn.out_proj.weight", (E, H * D)),), _linear, True),
        "w_in": _Recipe(((L + "mlp.fc_in.weight", (F, E)),), _linear, True),
        "b_in": _Recipe(((L + "mlp.fc_in.bias", (F,)),), _same, True),
        "w_out": _Recipe(((L + "mlp.fc_out.weight", (E, F)),), _linear, True),
        "b_out": _Recipe(((L + "mlp.fc_out.bias", (E,)),), _same, True),
    }
    for p, rows in (("q", H), ("k", K), ("v", K)):
        r["w" + p] = _Recipe(((L + f"attn.{p}_proj.weight", (rows * D, E)),), _linear, True)
    return r


def _experts_linear(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Per-expert torch Linear weights (out, in) → one einshard [X, in, out] weight."""
    return np.stack([x.T for x in xs]).reshape(shape)


def _moe_recipes(m: ModelSpec, prefix: str, names: dict[str, str]) -> dict[str, _Recipe]:
    """The router and the per-expert weights saved one tensor per expert (``experts.{j}.<name>``)."""
    E, F, X = m.d_model, m.expert_d_ff, m.experts
    L = "model.layers.{i}." + prefix
    r = {"w_router": _Recipe(((L + "gate.weight", (X, E)),), _linear, True)}
    for ours, theirs in names.items():
        shape = (E, F) if ours == "we_down" else (F, E)
        srcs = tuple((L + "experts." + str(j) + "." + theirs + ".weight", shape) for j in range(X))
        r[ours] = _Recipe(srcs, _experts_linear, True)
    return r


def _mixtral_recipes(m: ModelSpec, layout: str) -> dict[str, _Recipe]:
    """Llama's names; the MLP is ``block_sparse_moe`` with experts' w1 (gate), w3 (up), w2 (down)."""
    return {**_llama_recipes(m, layout),
            **_moe_recipes(m, "block_sparse_moe.", {"we_gate": "w1", "we_up": "w3", "we_down": "w2"})}


def _qwen_moe_recipes(m: ModelSpec, layout: str) -> dict[str, _Recipe]:
    """Qwen2-MoE, Qwen3-MoE and OLMoE: Llama's names; ``mlp.experts.{j}.{gate,up,down}_proj``; the
    shared expert with its gate (Qwen2-MoE); ``self_attn.{q,k}_norm`` (Qwen3: [D]; OLMoE: the
    whole projection, [heads * D], in the row order of einshard's flattened Q)."""
    E, F, D = m.d_model, m.d_ff, m.d_head
    L = "model.layers.{i}.mlp."
    r = {**_llama_recipes(m, layout),
         **_moe_recipes(m, "mlp.", {"we_gate": "gate_proj", "we_up": "up_proj", "we_down": "down_proj"})}
    A = "model.layers.{i}.self_attn."
    for which, heads in (("q", m.heads), ("k", m.kv_heads)):
        shape = (D,) if m.qk_norm == "head" else (heads * D,)
        r[which + "_norm"] = _Recipe(((A + which + "_norm.weight", shape),), _same, True)
    for n, (o, i) in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
        r["w_" + n] = _Recipe(((L + f"shared_expert.{n}_proj.weight", (o, i)),), _linear, True)
    r["w_shared_gate"] = _Recipe(((L + "shared_expert_gate.weight", (1, E)),), _same, True)
    return r


@dataclass(frozen=True)
class _Family:
    recipes: Callable[[ModelSpec, str], dict[str, _Recipe]]
    layer_re: re.Pattern[str]
    buffers: re.Pattern[str]  # tensors that are never weights (not reported as unused)


_FAMILIES: dict[str, _Family] = {
    "llama": _Family(_llama_recipes, re.compile(r"model\.layers\.(\d+)\."),
                     re.compile(r".*\.rotary_emb\.inv_freq\Z")),
    "mixtral": _Family(_mixtral_recipes, re.compile(r"model\.layers\.(\d+)\."),
                       re.compile(r".*\.rotary_emb\.inv_freq\Z")),
    "qwen_moe": _Family(_qwen_moe_recipes, re.compile(r"model\.layers\.(\d+)\."),
                         re.compile(r".*\.rotary_emb\.inv_freq\Z")),
    "falcon": _Family(_falcon_recipes, re.compile(r"transformer\.h\.(\d+)\."),
                      re.compile(r".*\.rotary_emb\.inv_freq\Z")),
    "gptj": _Family(_gptj_recipes, re.compile(r"transformer\.h\.(\d+)\."),
                    re.compile(r".*\.(attn\.bias|attn\.masked_bias|embed_positions)\Z")),
}
RECIPE_FAMILIES = tuple(_FAMILIES)


def recipes_for(family: str, model: ModelSpec, layout: str = "") -> dict[str, _Recipe]:
    """The family's einshard weight name → recipe table (``layout``: Falcon's fused-qkv order)."""
    return _FAMILIES[family].recipes(model, layout)


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _expand(rc: _Recipe, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The concrete HF names (one per layer for a layered recipe) with their expected shapes."""
    return [(t.format(i=i), shape) for t, shape in rc.sources for i in (range(layers) if rc.layered else [0])]


def _check_tensors(where: str, model: ModelSpec, family: str, wanted: list[tuple[str, tuple[int, ...]]],
                   index: Mapping[str, TensorInfo], accepted: Collection[str]) -> None:
    """One WeightsError listing every missing, mis-shaped, unreadable-dtype or unused tensor and any extra layer."""
    fam = _FAMILIES[family]
    missing: list[str] = []
    problems: list[str] = []
    for hf, shape in dict.fromkeys(wanted):
        info = index.get(hf)
        if info is None:
            missing.append(hf)
        elif info.shape != shape:
            problems.append(f"mis-shaped: {hf}: expected {_fmt(shape)}, got {_fmt(info.shape)}")
        elif info.dtype not in accepted:
            problems.append(f"unsupported dtype: {hf}: {info.dtype} ({', '.join(accepted)} expected)")
    extra = sorted({int(mt.group(1)) for n in index
                    if (mt := fam.layer_re.match(n)) and int(mt.group(1)) >= model.layers})
    if extra:
        problems.append(f"extra layers: the checkpoint has layer(s) {', '.join(map(str, extra))} "
                        f"but the model has {model.layers}")
    used = {hf for hf, _ in wanted}
    tied_head = "lm_head.weight" if model.tie_embeddings else None
    unused = [n for n in index if n not in used and n != tied_head and not fam.buffers.match(n)
              and not ((mt := fam.layer_re.match(n)) and int(mt.group(1)) >= model.layers)]
    problems += [f"unused: {n}" for n in sorted(unused)]
    if missing or problems:
        counts = ([f"{len(missing)} missing"] if missing else []) + \
                 ([f"{len(unused)} unused"] if unused else []) + \
                 ([f"{len(problems) - len(unused)} other problem(s)"] if len(problems) > len(unused) else [])
        lines = [f"missing: {n}" for n in missing] + problems
        hint = None
        if unused:
            hint = ("the checkpoint holds tensors this model has no place for: the model (family, bias, "
                    "tied embeddings) is not the one the checkpoint was trained as")
        raise WeightsError(f"checkpoint '{where}' does not fit model '{model.name}' ({', '.join(counts)}):\n  "
                           + "\n  ".join(lines), hint=hint)


def _out_dtype(t: TensorType) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if t.dtype == "bf16" else np.dtype(np.float32)


def assemble(where: str, model: ModelSpec, family: str, weight_types: Mapping[str, TensorType],
             index: Mapping[str, TensorInfo], *, layout: str = "", accepted: Collection[str]) -> dict[str, np.ndarray]:
    """Einshard weights (float32, bf16 for bf16-typed weights) shaped as ``weight_types``.

    ``index`` holds every tensor of the checkpoint under its HF name; ``accepted`` the dtypes
    its readers can convert. ``model`` fixes the expected HF shapes, so a config that does not
    fit its tensors shows up as mis-shaped tensors.
    """
    recipes = recipes_for(family, model, layout)
    unknown = [n for n in weight_types if n not in recipes]
    if unknown:
        raise WeightsError(f"a {family} checkpoint has no tensors for einshard weight(s) {', '.join(unknown)}",
                           hint="the weight types come from a module built for another model")
    wanted = [src for n in weight_types for src in _expand(recipes[n], model.layers)]
    _check_tensors(where, model, family, wanted, index, accepted)

    # Each HF tensor is read once and dropped after its last use (Falcon's fused qkv feeds six
    # einshard weights), so peak memory stays near one copy of the weights.
    uses: dict[str, int] = {}
    for hf, _ in wanted:
        uses[hf] = uses.get(hf, 0) + 1
    cache: dict[str, np.ndarray] = {}

    def get(hf: str) -> np.ndarray:
        arr = cache.pop(hf) if hf in cache else index[hf].read()
        uses[hf] -= 1
        if uses[hf]:
            cache[hf] = arr
        return arr

    out: dict[str, np.ndarray] = {}
    for name, t in weight_types.items():
        rc, shape = recipes[name], tuple(t.shape)
        try:
            if rc.layered:
                arr = np.stack([rc.convert([get(s.format(i=i)) for s, _ in rc.sources], shape[1:])
                                for i in range(model.layers)])
            else:
                arr = rc.convert([get(s) for s, _ in rc.sources], shape)
        except ValueError as e:  # shapes were checked above; only an inconsistent weight type gets here
            raise WeightsError(f"cannot make einshard weight '{name}' {_fmt(shape)} from "
                               f"{', '.join(s for s, _ in rc.sources)}: {e}") from None
        if arr.shape != shape:
            raise WeightsError(f"einshard weight '{name}' came out {_fmt(arr.shape)}, expected {_fmt(shape)}")
        out[name] = np.ascontiguousarray(arr, dtype=_out_dtype(t))
    return out
