"""Hugging Face safetensors checkpoints → einshard weight arrays.

``load_hf_weights`` reads the ``*.safetensors`` files of a checkpoint directory (a single file or
the shards of a sharded checkpoint) without torch, detects the family from ``config.json`` and
maps the HF tensors onto the einshard weight names of ``compiler.build`` (``layer_weights``,
``global_weights``):

- per-layer tensors are stacked along the leading N dim;
- torch ``Linear`` weights, stored (out, in), are transposed to (in, out) and their head axis split
  into einshard's head letters: query head ``h`` becomes (k, g) with ``h = k*G + g``, as a row-major
  reshape of the HF (heads*d_head) axis gives;
- Falcon's fused ``query_key_value`` rows are split as FalconAttention splits them:
  ``[H query heads | K | V]`` (multiquery), per head ``[q | k | v]`` (multihead), per K/V group
  ``[G query heads | k | v]`` (new decoder architecture);
- tied embeddings: einshard then has no ``lm_head`` weight (the logits read ``embed``), so an
  ``lm_head.weight`` in the file is ignored;
- einshard's ``lm_head_bias`` exists whenever bias is not ``none``; Llama and Falcon have none, so
  it is zero (exact).

The ModelSpec must equal the one ``config.json`` describes (``runtime.hf_config``; the name aside):
weights cannot reveal a different activation, norm eps or rotary form, and a spec that differs
there would run without error and give wrong logits.

Tensors the model does not use are ignored: rotary ``inv_freq`` / ``embed_positions`` buffers,
GPT-J's old ``attn.bias``/``attn.masked_bias`` masks, a tied ``lm_head.weight``. A tensor of a
layer beyond ``model.layers`` is an error: config.json and the tensors disagree.

Every failure is a ``WeightsError``: all missing and all mis-shaped (or non-float) tensors are
listed together, so one run shows everything that is wrong. F32, F64, F16 and BF16 tensors are
accepted (numpy has no bfloat16: BF16 payloads are read from the raw bytes, widened to float32).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors import safe_open

from ir.errors import SpecError, WeightsError
from ir.model import ModelSpec
from ir.types import TensorType
from runtime.hf_config import HFConfig, falcon_qkv_layout, hf_family, model_from_config, read_hf_config

__all__ = ["load_hf_weights", "read_safetensors_index", "TensorInfo"]

_NP_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header (no data read)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the payload in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses a safetensors header; any inconsistency is a WeightsError naming the file."""
    def bad(why: str) -> WeightsError:
        return WeightsError(f"cannot read '{path}': {why}", hint="the file is truncated or not a safetensors file")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("file shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise bad(f"header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, t) = str(e["dtype"]), tuple(int(s) for s in e["shape"]), e["data_offsets"]
            b, t = int(b), int(t)
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed header entry for '{name}'") from None
        want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if not 0 <= b <= t or base + t > size or (dtype in _ITEMSIZE and t - b != want):
            raise bad(f"the data of '{name}' lies outside the file or has the wrong length")
        out[name] = TensorInfo(path, dtype, shape, base + b, base + t)
    return out


def read_safetensors_index(directory: str | Path) -> dict[str, TensorInfo]:
    """Name → TensorInfo over all ``*.safetensors`` files of ``directory`` (sorted by name)."""
    d = Path(directory)
    files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not files:
        hint = None
        if d.is_dir() and any(d.glob("*.bin")):
            hint = "only PyTorch .bin files found; re-save with save_pretrained(..., safe_serialization=True)"
        raise WeightsError(f"no *.safetensors files in '{d}'", hint=hint)
    index: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in _read_header(f).items():
            if name in index:
                raise WeightsError(f"tensor '{name}' appears in both '{index[name].file.name}' and '{f.name}'")
            index[name] = info
    return index


def _read_tensor(info: TensorInfo, name: str) -> np.ndarray:
    """The tensor as float32 (BF16 widened from its raw bits; numpy cannot represent it)."""
    try:
        if info.dtype == "BF16":
            with info.file.open("rb") as f:
                f.seek(info.start)
                raw = f.read(info.end - info.start)
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(info.shape)
        with safe_open(str(info.file), framework="numpy") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)
    except Exception as e:  # OSError, or SafetensorError (a plain Exception subclass)
        raise WeightsError(f"cannot read tensor '{name}' from '{info.file}': {e}") from None


# ---------------------------------------------------------------------------------------------
# Recipes: which HF tensors make one einshard weight, and how


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


def _llama_recipes(m: ModelSpec, cfg: HFConfig) -> dict[str, _Recipe]:
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
    for w, n, rows in (("q", "q", H), ("k", "k", K), ("v", "v", K)):
        r["w" + w] = _Recipe(((L + f"self_attn.{n}_proj.weight", (rows * D, E)),), _linear, True)
        r["b" + w] = _Recipe(((L + f"self_attn.{n}_proj.bias", (rows * D,)),), _same, True)
    r["wo"] = _Recipe(((L + "self_attn.o_proj.weight", (E, H * D)),), _linear, True)
    r["bo"] = _Recipe(((L + "self_attn.o_proj.bias", (E,)),), _same, True)
    for n, (o, i) in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
        r["w_" + n] = _Recipe(((L + f"mlp.{n}_proj.weight", (o, i)),), _linear, True)
        r["b_" + n] = _Recipe(((L + f"mlp.{n}_proj.bias", (o,)),), _same, True)
    return r


def _falcon_recipes(m: ModelSpec, cfg: HFConfig) -> dict[str, _Recipe]:
    E, H, K, D, F, V = m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab
    layout = falcon_qkv_layout(cfg)  # K agrees with it: the model equals the one config.json describes
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
        r["w" + part] = _Recipe(((qkv + "weight", (rows, E)),),
                                lambda xs, s, pick=pick: pick(xs[0]).T.reshape(s), True)
        r["b" + part] = _Recipe(((qkv + "bias", (rows,)),), lambda xs, s, pick=pick: pick(xs[0]).reshape(s), True)
    return r


def _gptj_recipes(m: ModelSpec, cfg: HFConfig) -> dict[str, _Recipe]:
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


_RECIPES: dict[str, Callable[[ModelSpec, HFConfig], dict[str, _Recipe]]] = {
    "llama": _llama_recipes, "falcon": _falcon_recipes, "gptj": _gptj_recipes,
}
_LAYER_RE = {"llama": re.compile(r"model\.layers\.(\d+)\."), "falcon": re.compile(r"transformer\.h\.(\d+)\."),
             "gptj": re.compile(r"transformer\.h\.(\d+)\.")}


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_same_model(model: ModelSpec, described: ModelSpec, cfg: HFConfig) -> None:
    """The spec must describe the checkpoint: weights alone cannot reveal a different activation,
    norm eps, rotary or block form, and running with one would silently give wrong logits."""
    diffs = [f"{f.name}: the spec says {getattr(model, f.name)!r}, {cfg.path.name} says {getattr(described, f.name)!r}"
             for f in fields(ModelSpec) if f.name != "name" and getattr(model, f.name) != getattr(described, f.name)]
    if diffs:
        raise WeightsError(f"model '{model.name}' does not describe the checkpoint in '{cfg.path.parent}':\n  "
                           + "\n  ".join(diffs), hint="derive the model block with `einshard spec-from-hf DIR`")


def _expand(rc: _Recipe, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The concrete HF names (one per layer for a layered recipe) with their expected shapes."""
    return [(t.format(i=i), shape) for t, shape in rc.sources for i in (range(layers) if rc.layered else [0])]


def _check_tensors(d: Path, model: ModelSpec, family: str, wanted: list[tuple[str, tuple[int, ...]]],
                   index: Mapping[str, TensorInfo]) -> None:
    """One WeightsError listing every missing, mis-shaped or non-float tensor and any extra layer."""
    missing: list[str] = []
    problems: list[str] = []
    for hf, shape in dict.fromkeys(wanted):
        info = index.get(hf)
        if info is None:
            missing.append(hf)
        elif info.shape != shape:
            problems.append(f"mis-shaped: {hf}: expected {_fmt(shape)}, got {_fmt(info.shape)}")
        elif info.dtype not in _NP_DTYPES and info.dtype != "BF16":
            problems.append(f"unsupported dtype: {hf}: {info.dtype} (F32, F64, F16 or BF16 expected)")
    extra = sorted({int(mt.group(1)) for n in index if (mt := _LAYER_RE[family].match(n))
                    and int(mt.group(1)) >= model.layers})
    if extra:
        problems.append(f"extra layers: the checkpoint has layer(s) {', '.join(map(str, extra))} "
                        f"but the model has {model.layers}")
    if missing or problems:
        counts = ([f"{len(missing)} missing"] if missing else []) + \
                 ([f"{len(problems)} other problem(s)"] if problems else [])
        lines = [f"missing: {n}" for n in missing] + problems
        raise WeightsError(f"checkpoint '{d}' does not fit model '{model.name}' ({', '.join(counts)}):\n  "
                           + "\n  ".join(lines))


def load_hf_weights(directory: str | Path, model: ModelSpec,
                    weight_types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
    """Einshard weights (float32, shaped as ``weight_types``) from a Hugging Face checkpoint.

    ``weight_types`` is {param name: type} of the entry function's ``weight`` params; exactly
    those names are returned. ``model`` must be the model that ``config.json`` describes (all
    fields but the name; see ``runtime.hf_config.model_from_config``), and it fixes the expected HF tensor
    shapes, so a config.json that does not fit its tensors shows up as mis-shaped tensors.
    """
    d = Path(directory)
    try:
        cfg = read_hf_config(d)
        family = hf_family(cfg)
        described = model_from_config(cfg)
    except SpecError as e:
        raise WeightsError(e.message, e.loc, e.hint) from None
    _check_same_model(model, described, cfg)
    recipes = _RECIPES[family](model, cfg)
    unknown = [n for n in weight_types if n not in recipes]
    if unknown:
        raise WeightsError(f"a {family} checkpoint has no tensors for einshard weight(s) {', '.join(unknown)}",
                           hint="the weight types come from a module built for another model")
    index = read_safetensors_index(d)
    wanted = [src for n in weight_types for src in _expand(recipes[n], model.layers)]
    _check_tensors(d, model, family, wanted, index)

    # Each HF tensor is read once and dropped after its last use (Falcon's fused qkv feeds six
    # einshard weights), so peak memory stays near one copy of the weights.
    uses: dict[str, int] = {}
    for hf, _ in wanted:
        uses[hf] = uses.get(hf, 0) + 1
    cache: dict[str, np.ndarray] = {}

    def get(hf: str) -> np.ndarray:
        arr = cache.pop(hf) if hf in cache else _read_tensor(index[hf], hf)
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
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out
