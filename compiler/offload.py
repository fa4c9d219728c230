"""From a spec and a checkpoint to a layer-streaming runner (runtime/offload.py).

The compiler half of ``--offload disk``: the store key (which checkpoint files, which model and
served weight format), the one-time conversion of the checkpoint into the offload store (through
the module's ``@prepare``, so int8 is quantized once and streamed as int8), and the runner over
the modules of each program shape. The conversion loads the checkpoint once as the resident
path does; every later run reads only the store, within the memory budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from compiler.generation import fixed_layout, module_for
from compiler.spec import Spec
from ir.errors import SpecError
from ir.module import Module

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000, '1.5GiB' -> 1610612736, '4096' -> 4096 bytes."""
    m = _SIZE.match(text or "")
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise SpecError(f"cannot read the size {text!r}", hint="write e.g. 200MB, 1.5GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def store_key(checkpoint: Path, spec: Spec) -> str:
    """Names the prepared weights: the checkpoint's files (path, size, mtime), the model and the
    served weight format. A changed checkpoint or format gets a new store."""
    p = Path(checkpoint).resolve()
    files = sorted(p.glob("*")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and f.suffix in (".safetensors", ".gguf", ".json"):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(repr(spec.model).encode())
    h.update(json.dumps({"weights": spec.serve.weights}).encode())
    return h.hexdigest()[:20]


def default_store_dir(key: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "einshard" / "offload" / key


def offload_builder(spec: Spec, cache_len: int, batch: int = 1) -> Callable[[str, int, int], Module]:
    if spec.mesh.n_devices > 1:
        raise SpecError("--offload streams layers on one device; drop --mesh (or give mesh 1)")
    fixed = fixed_layout(spec, batch)

    def build(phase: str, b: int, length: int) -> Module:
        return module_for(fixed, phase, b, length, cache_len)

    return build


def ensure_store(spec: Spec, key: str, directory: Path, load_weights: Callable[[], Mapping[str, np.ndarray]]) -> bool:
    """Writes the offload store unless a matching one is there; True when it was written now."""
    from runtime.offload import write_offload_store
    from runtime.offload_store import read_layout
    from ir.errors import WeightsError

    try:
        read_layout(directory, key)
        return False
    except WeightsError:
        pass
    from runtime.generate import prepared_weights
    from runtime.lower_jax import JaxExecutor

    module = module_for(spec, "decode", 1, 1, 8)
    weights = load_weights()
    prepared = prepared_weights(JaxExecutor(module), weights)
    write_offload_store(module, dict(prepared), directory, key)
    return True


def make_offload_runner(spec: Spec, store: Path, key: str, cache_len: int, budget: int, batch: int = 1,
                        prefetch: bool = True, evict_after_read: bool = False, poison: bool = False):
    """An OffloadRunner for ``spec`` over the store in ``store`` (see runtime/offload.py)."""
    from runtime.offload import OffloadRunner

    return OffloadRunner(offload_builder(spec, cache_len, batch), Path(store), key, cache_len, spec.model.vocab,
                         budget, prefetch, evict_after_read, poison)
