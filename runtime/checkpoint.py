"""Checkpoints: one object per model file(s) that knows its ModelSpec, its weights and its tokenizer.

``open_checkpoint`` takes a Hugging Face directory (``config.json`` + ``*.safetensors``, maybe
sharded, + ``tokenizer.json``/``tokenizer_config.json``) or a ``.gguf`` file (``runtime.gguf``).
Both present their tensors under HF names to ``runtime.recipes.assemble``, so every format gets
the same checks: the ModelSpec must equal the one the checkpoint describes (the name aside;
weights cannot reveal a different activation, norm eps or rotary form, and a spec that differs
there would run without error and give wrong logits), every tensor needed is there with its
shape, and every tensor in the checkpoint is used.

safetensors files are read with the ``safetensors`` library (``safe_open``, numpy framework;
BF16 arrives as ``ml_dtypes.bfloat16``); F64, F32, F16 and BF16 are accepted.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from safetensors import safe_open

from ir.errors import SpecError, WeightsError
from ir.model import ModelSpec
from ir.types import TensorType
from runtime.hf_config import HFConfig, falcon_qkv_layout, hf_family, model_from_config, read_hf_config
from runtime.recipes import TensorInfo, assemble

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer

__all__ = ["Checkpoint", "HFCheckpoint", "TensorInfo", "check_same_model", "load_hf_weights", "open_checkpoint",
           "read_safetensors_index"]

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class Checkpoint(ABC):
    """A model on disk: its ModelSpec, its weights as einshard arrays, its tokenizer."""

    path: Path

    @abstractmethod
    def model_spec(self) -> ModelSpec:
        """The model the checkpoint describes (SpecError when einshard cannot represent it)."""

    @abstractmethod
    def load_weights(self, model: ModelSpec, types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
        """Einshard weight name → array (float32; bf16 where ``types`` says bf16), exactly ``types``' names.

        WeightsError when ``model`` is not the checkpoint's model, and on any missing,
        mis-shaped, unreadable or unused tensor (all listed together).
        """

    @abstractmethod
    def tokenizer(self) -> "Tokenizer":
        """The checkpoint's tokenizer; WeightsError when it has none."""


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Hugging Face checkpoint directory or a ``.gguf`` file (or a directory holding one .gguf)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    if p.suffix == ".gguf" or (p.is_file() and _has_gguf_magic(p)):
        from runtime.gguf import GGUFCheckpoint

        return GGUFCheckpoint(p)
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not p.exists():
        raise WeightsError(f"no checkpoint at '{p}'", hint="give a Hugging Face checkpoint directory or a .gguf file")
    if not p.is_dir():
        raise WeightsError(f"'{p}' is neither a Hugging Face checkpoint directory nor a .gguf file")
    return HFCheckpoint(p)


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_same_model(model: ModelSpec, described: ModelSpec, source: str, where: str) -> None:
    """The spec must describe the checkpoint: weights alone cannot reveal a different activation,
    norm eps, rotary or block form, and running with one would silently give wrong logits."""
    diffs = [f"{f.name}: the spec says {getattr(model, f.name)!r}, {source} says {getattr(described, f.name)!r}"
             for f in fields(ModelSpec) if f.name != "name" and getattr(model, f.name) != getattr(described, f.name)]
    if diffs:
        raise WeightsError(f"model '{model.name}' does not describe the checkpoint in '{where}':\n  "
                           + "\n  ".join(diffs), hint="derive the model block with `einshard spec-from-hf PATH`")


# ---------------------------------------------------------------------------------------------
# safetensors


def _read_tensor(file: Path, name: str) -> np.ndarray:
    """One tensor as float32 (BF16 and F16 widen exactly)."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)
    except Exception as e:  # OSError, or SafetensorError (a plain Exception subclass)
        raise WeightsError(f"cannot read tensor '{name}' from '{file}': {e}") from None


def _file_index(file: Path) -> dict[str, TensorInfo]:
    """Name → TensorInfo of one safetensors file, from its header (no data read)."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            out: dict[str, TensorInfo] = {}
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = TensorInfo(file, str(s.get_dtype()), tuple(int(n) for n in s.get_shape()),
                                       partial(_read_tensor, file, name))
            return out
    except WeightsError:
        raise
    except Exception as e:  # OSError, SafetensorError: truncated or not a safetensors file
        raise WeightsError(f"cannot read '{file}': {e}",
                           hint="the file is truncated or not a safetensors file") from None


def _shard_files(d: Path) -> list[Path]:
    """The files of ``model.safetensors.index.json`` when there is one, else every ``*.safetensors``."""
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"cannot read '{idx}': {e}") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise WeightsError(f"'{idx.name}' names shard(s) that are not in '{d}': {', '.join(missing)}")
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors")) if d.is_dir() else []


def read_safetensors_index(directory: str | Path) -> dict[str, TensorInfo]:
    """Name → TensorInfo over all safetensors files of ``directory`` (one file or the shards)."""
    d = Path(directory)
    files = _shard_files(d)
    if not files:
        hint = None
        if d.is_dir() and any(d.glob("*.bin")):
            hint = "only PyTorch .bin files found; re-save with save_pretrained(..., safe_serialization=True)"
        raise WeightsError(f"no *.safetensors files in '{d}'", hint=hint)
    index: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in _file_index(f).items():
            if name in index:
                raise WeightsError(f"tensor '{name}' appears in both '{index[name].file.name}' and '{f.name}'")
            index[name] = info
    return index


class HFCheckpoint(Checkpoint):
    """A Hugging Face directory as written by ``save_pretrained``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def config(self) -> HFConfig:
        return read_hf_config(self.path)

    def model_spec(self) -> ModelSpec:
        return model_from_config(self.config())

    def described(self) -> tuple[HFConfig, str, ModelSpec]:
        """The config, family and model this directory describes, for the eager and the lazy
        (runtime/sliced_weights.py) loaders alike; a config einshard cannot take is a WeightsError
        here (the checkpoint is what is wrong, not the spec)."""
        try:
            cfg = self.config()
            return cfg, hf_family(cfg), model_from_config(cfg)
        except SpecError as e:
            raise WeightsError(e.message, e.loc, e.hint) from None

    def load_weights(self, model: ModelSpec, types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
        cfg, family, described = self.described()
        check_same_model(model, described, cfg.path.name, str(self.path))
        layout = falcon_qkv_layout(cfg) if family == "falcon" else ""
        index = read_safetensors_index(self.path)
        return assemble(str(self.path), model, family, types, index, layout=layout, accepted=FLOAT_DTYPES)

    def tokenizer(self) -> "Tokenizer":
        from runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_directory(self.path)
        tok.check_vocab(self.model_spec().vocab)
        return tok


def load_hf_weights(directory: str | Path, model: ModelSpec,
                    weight_types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
    """``HFCheckpoint(directory).load_weights(model, weight_types)`` (the name callers already use)."""
    return HFCheckpoint(directory).load_weights(model, weight_types)
