"""GGUF files (llama.cpp's format) as checkpoints: ModelSpec from the metadata, weights dequantized.

Read with the ``gguf`` package (llama.cpp's own reader, memory-mapped) and dequantized with its
``gguf.quants.dequantize``; nothing is parsed by hand. The tensors are presented under Hugging
Face names with HF (out, in) shapes, so ``runtime.recipes.assemble`` applies the same checks as
to a safetensors checkpoint (missing, mis-shaped, unused tensors; the model must be the file's).

Neither architecture has sliding-window attention in llama.cpp (nor in transformers' reading of
these files), so a GGUF model has none.

Llama-family files: llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` per head from
HF's rotate-half order into interleaved pairs (its rope kernel rotates adjacent pairs). einshard
(like transformers) rotates halves, so the permutation is undone on load: a head's rows
``[p0a p0b p1a p1b ...]`` go back to ``[p0a p1a ... | p0b p1b ...]``. Qwen2 files are not permuted.
"""

from __future__ import annotations

import re
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ir.errors import SpecError, WeightsError
from ir.model import ModelSpec
from ir.types import TensorType
from runtime.checkpoint import Checkpoint, check_same_model
from runtime.recipes import TensorInfo, assemble

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

    from runtime.tokenizer import Tokenizer

__all__ = ["ARCHITECTURES", "DEQUANTIZABLE", "GGUFCheckpoint", "unpermute_rows"]

ARCHITECTURES = ("llama", "qwen2")
"""``general.architecture`` values einshard reads (both map onto the llama family's tensor names)."""

DEQUANTIZABLE = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K")
"""GGML tensor types loaded (dequantized to float32 by ``gguf.quants.dequantize``)."""

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)\Z")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; a name with no HF counterpart is kept (and reported unused)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (``heads`` = the tensor's own head count).

    The converter reshapes each head's rows as (2, d/2) and swaps the axes, interleaving the two
    halves that rotate-half pairs; here the rows are read as (d/2, 2) and swapped back.
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize_raw(t: "ReaderTensor", raw: np.ndarray, where: Path) -> np.ndarray:
    """gguf's own dequantizer over ``raw`` (all or a box of ``t``'s bytes), float32; its two
    failures (a type it does not implement, bytes that are not whole blocks) as a WeightsError."""
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(raw, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
        raise WeightsError(f"cannot dequantize GGUF tensor '{t.name}' ({t.tensor_type.name}) in '{where}': {e}") \
            from None


def _dequantize(t: "ReaderTensor", where: Path, permute_heads: int = 0) -> np.ndarray:
    arr = _dequantize_raw(t, t.data, where).reshape(tuple(int(n) for n in reversed(t.shape)))
    return unpermute_rows(arr, permute_heads) if permute_heads else arr


def read_box(t: "ReaderTensor", where: Path, permute_heads: int,
             box: tuple[slice, ...]) -> tuple[np.ndarray, int]:
    """One box (contiguous ranges) of a tensor in its HF shape, float32, and the file bytes read.

    Only the rows of the box are touched, and of each row only the quantization blocks that
    cover its columns (a block runs along the row, GGUF's contiguous dim): the memory map pages
    in just those bytes. llama q/k rows are read as whole heads, unpermuted, then cut."""
    from gguf.constants import GGML_QUANT_SIZES

    shape = tuple(int(n) for n in reversed(t.shape))
    r0, r1, _ = box[0].indices(shape[0])
    r1 = max(r0, r1)
    a, b = r0, r1
    if permute_heads:  # llama.cpp interleaved each head's rows: read whole heads
        rows_per_head = shape[0] // permute_heads
        a, b = r0 // rows_per_head * rows_per_head, -(-r1 // rows_per_head) * rows_per_head
    data = t.data
    cut: tuple[slice, ...]
    if len(shape) == 1:  # norms and biases (f32): the range; a quantized one whole
        raw = data if data.dtype == np.uint8 else data[a:b]
        first = 0 if data.dtype == np.uint8 else a
        cut = (slice(r0 - first, r1 - first),)
    else:
        c0, c1, _ = (box[1] if len(box) > 1 else slice(None)).indices(shape[1])
        c1 = max(c0, c1)
        if data.dtype == np.uint8:  # quantized (or bf16): each row is type_size bytes per block
            block, size = GGML_QUANT_SIZES[t.tensor_type]
            k0, k1 = c0 // block, -(-c1 // block)
            raw, first = data[a:b, k0 * size:k1 * size], k0 * block
        else:  # f32/f16: one element per column
            raw, first = data[a:b, c0:c1], c0
        cut = (slice(r0 - a, r1 - a), slice(c0 - first, c1 - first))
    arr = _dequantize_raw(t, np.ascontiguousarray(raw), where)
    if permute_heads:
        arr = unpermute_rows(arr, (b - a) // (shape[0] // permute_heads))
    return arr[cut], int(raw.nbytes)


class GGUFCheckpoint(Checkpoint):
    """One ``.gguf`` file: metadata → ModelSpec and tokenizer, tensors → einshard weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @cached_property
    def reader(self) -> "GGUFReader":
        from gguf import GGUFReader

        if not self.path.is_file():
            raise WeightsError(f"no GGUF file at '{self.path}'")
        try:
            return GGUFReader(str(self.path))
        except Exception as e:  # ValueError on a bad magic/version, struct/IndexError on truncation
            raise WeightsError(f"cannot read GGUF file '{self.path}': {e}",
                               hint="the file is truncated or not a GGUF file") from None

    # -- metadata

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (scalar, string or list), or ``default`` when the key is absent."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _error(self, message: str, hint: str | None = None) -> SpecError:
        return SpecError(f"{self.path}: {message}", None, hint)

    def architecture(self) -> str:
        arch = self.field("general.architecture")
        if arch not in ARCHITECTURES:
            raise self._error(f"unsupported GGUF architecture {arch!r}",
                              f"supported general.architecture values: {', '.join(ARCHITECTURES)}")
        return str(arch)

    def _int(self, key: str, default: int | None = None) -> int:
        v = self.field(key, default)
        if v is None:
            raise self._error(f"GGUF metadata lacks '{key}'")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise self._error(f"GGUF metadata '{key}' must be a positive integer, got {v!r}")
        return int(v)

    def _float(self, key: str, default: float) -> float:
        v = self.field(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not v > 0:
            raise self._error(f"GGUF metadata '{key}' must be a positive number, got {v!r}")
        return float(v)

    def _name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.+\-]+", "-", self.path.stem).strip("-")
        return name or "model"

    def _vocab(self, arch: str) -> int:
        v = self.field(f"{arch}.vocab_size")
        if v is not None:
            return self._int(f"{arch}.vocab_size")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            return len(tokens.data)
        emb = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise self._error(f"GGUF metadata lacks '{arch}.vocab_size' and the file has no token_embd.weight")
        return int(emb.shape[-1])

    def model_spec(self) -> ModelSpec:
        arch = self.architecture()
        scaling = self.field(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise self._error(f"rope scaling '{scaling}' ({arch}.rope.scaling.type) is not supported",
                              "einshard implements plain rotary embeddings only")
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise self._error("the file carries rope_freqs.weight (llama3-style rope scaling), which is not supported")
        E, H = self._int(f"{arch}.embedding_length"), self._int(f"{arch}.attention.head_count")
        d_head = self._int(f"{arch}.attention.key_length", E // H if E % H == 0 else None)
        if self._int(f"{arch}.attention.value_length", d_head) != d_head:
            raise self._error("attention.key_length and attention.value_length differ")
        rotary = self._int(f"{arch}.rope.dimension_count", d_head)
        if rotary != d_head:
            raise self._error(f"{arch}.rope.dimension_count ({rotary}) is not the head size ({d_head})",
                              "partial rotary embeddings are not supported for this family")
        names = {t.name for t in self.reader.tensors}
        try:
            return ModelSpec(
                name=self._name(), layers=self._int(f"{arch}.block_count"), d_model=E, heads=H,
                kv_heads=self._int(f"{arch}.attention.head_count_kv", H), d_head=d_head,
                d_ff=self._int(f"{arch}.feed_forward_length"), vocab=self._vocab(arch), block="serial", mlp="swiglu",
                norm="rmsnorm", norm_eps=self._float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=self._float(f"{arch}.rope.freq_base", 10000.0), rotary_dim=d_head, rotary_style="half",
                bias="qkv" if arch == "qwen2" else "none", tie_embeddings="output.weight" not in names)
        except SpecError as e:
            raise self._error(e.message, e.hint) from None

    # -- weights

    def tensor_index(self, model: ModelSpec) -> dict[str, TensorInfo]:
        """HF name → TensorInfo of every tensor in the file (q/k rows unpermuted for llama files)."""
        index: dict[str, TensorInfo] = {}
        for name, t, heads in self._tensors(model):
            shape = tuple(int(n) for n in reversed(t.shape))
            index[name] = TensorInfo(self.path, t.tensor_type.name, shape, partial(_dequantize, t, self.path, heads))
        return index

    def _tensors(self, model: ModelSpec) -> list[tuple[str, "ReaderTensor", int]]:
        """(HF name, tensor, heads whose q/k rows llama.cpp permuted, else 0) for every tensor."""
        permute = self.architecture() == "llama"
        out, names = [], set()
        for t in self.reader.tensors:
            name = hf_name(t.name)
            heads = 0
            if permute and name.endswith("self_attn.q_proj.weight"):
                heads = model.heads
            elif permute and name.endswith("self_attn.k_proj.weight"):
                heads = model.kv_heads
            if name in names:
                raise WeightsError(f"tensor '{t.name}' appears twice in '{self.path}'")
            names.add(name)
            out.append((name, t, heads))
        return out

    def box_readers(self, model: ModelSpec) -> dict[str, Callable[[tuple[slice, ...]], tuple[np.ndarray, int]]]:
        """HF name → a reader of one box of that tensor (runtime/sliced_weights.py): each
        process of a multi-process run reads only the rows and blocks its devices hold."""
        return {name: partial(read_box, t, self.path, heads) for name, t, heads in self._tensors(model)}

    def load_weights(self, model: ModelSpec, types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
        try:
            described = self.model_spec()
        except SpecError as e:
            raise WeightsError(e.message, e.loc, e.hint) from None
        check_same_model(model, described, "its GGUF metadata", str(self.path))
        return assemble(str(self.path), model, "llama", types, self.tensor_index(model), accepted=DEQUANTIZABLE)

    def tokenizer(self) -> "Tokenizer":
        from runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(self)
        tok.check_vocab(self.model_spec().vocab)
        return tok
