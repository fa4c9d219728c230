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

from compiler.spec import Spec
from ir.errors import FileError, SpecError
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
    """Names the prepared weights: the checkpoint's files (path, size, mtime), the model, the
    served weight format and the store's plan (:func:`store_contents`). A changed checkpoint,
    format or program (a pass that makes other weights) gets a new store."""
    p = Path(checkpoint).resolve()
    files = sorted(p.glob("*")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and f.suffix in (".safetensors", ".gguf", ".json"):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(repr(spec.model).encode())
    h.update(json.dumps({"weights": spec.serve.weights}).encode())
    h.update(store_contents(spec).encode())
    return h.hexdigest()[:20]


def store_contents(spec: Spec) -> str:
    """What a store for ``spec`` holds: the plan of every weight the decode program takes (name,
    dtype, stored shape and layout). The passes can change it for the same checkpoint and format
    (quantize-int8 made a tied table int8 with ``embed_scale``), and a store of other weights must
    be rebuilt, not refused mid-run, so it is part of the key."""
    from compiler.generation import module_for  # JAX: only once the devices are set up
    from runtime.offload_convert import store_plan

    layout = store_plan(module_for(spec, "decode", 1, 1, 8), "")
    return repr((layout.layers, layout.globals_, layout.layer, layout.perms))


def default_store_dir(key: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "einshard" / "offload" / key


def offload_builder(spec: Spec, cache_len: int, batch: int = 1) -> Callable[[str, int, int, int], Module]:
    if spec.mesh.n_devices > 1:
        raise SpecError("--offload streams layers on one device; drop --mesh (or give mesh 1)")
    from compiler.generation import fixed_layout, module_for  # JAX: only once the devices are set up

    fixed = fixed_layout(spec, batch)

    def build(phase: str, b: int, length: int, context: int) -> Module:
        return module_for(fixed, phase, b, length, context)

    return build


def ensure_store(spec: Spec, key: str, directory: Path, load_weights: Callable[[], Mapping[str, np.ndarray]],
                 budget: int | None = None) -> bool:
    """Writes the offload store unless a matching one is there; True when it was written now.

    ``load_weights`` may give lazy weights (runtime/sliced_weights.py): the conversion reads and
    writes one @prepare group (one layer of it) at a time (runtime/offload_convert.py), so its
    memory is about one tensor's, not the model's. A ``budget`` too small for the resident
    weights and one layer is refused before anything is read."""
    from runtime.offload_store import read_layout
    from ir.errors import WeightsError

    try:
        read_layout(directory, key)
        return False
    except WeightsError:
        pass
    from compiler.generation import module_for
    from runtime.offload import budget_slots
    from runtime.offload_convert import MixedPrepareGroup, convert_to_store, prepare_groups, store_plan

    module = module_for(spec, "decode", 1, 1, 8)
    layout = store_plan(module, key)
    if budget is not None:
        budget_slots(budget, layout)
    one = module_for(replace(spec, model=replace(spec.model, layers=1)), "decode", 1, 1, 8)
    try:
        prepare_groups(one)
    except MixedPrepareGroup:  # a @prepare that mixes layers and globals: convert the whole model at once
        from runtime.generate import prepared_weights
        from runtime.lower_jax import JaxExecutor
        from runtime.offload import fmt_bytes, write_offload_store

        need = whole_conversion_bytes(module, layout.file_bytes)
        if budget is not None and need > budget:
            raise SpecError(f"this model's @prepare mixes per-layer and global weights, so its offload store "
                            f"is converted from the whole model at once: about {fmt_bytes(need)} (raw and "
                            f"prepared weights), over the memory budget of {fmt_bytes(budget)}",
                            hint=f"convert once with --memory-budget of at least {fmt_bytes(need)} ({need} bytes), "
                                 f"or with --offload-dir on a machine with that memory; later runs read only the store")

        weights = {k: np.asarray(v) for k, v in load_weights().items()}
        write_offload_store(module, dict(prepared_weights(JaxExecutor(module), weights)), directory, key)
        return True
    convert_to_store(one, layout, load_weights(), directory)
    return True


def whole_conversion_bytes(module: Module, prepared_bytes: int) -> int:
    """Memory the whole-model conversion holds at its peak: every raw weight (@prepare's params)
    plus the prepared weights it writes."""
    from runtime.lower_jax import JNP_DTYPES

    raw = sum(int(np.prod(p.type.shape, dtype=np.int64)) * np.dtype(JNP_DTYPES[p.type.dtype]).itemsize
              for p in module.raw_weight_params())
    return raw + prepared_bytes


def make_offload_runner(spec: Spec, store: Path, key: str, cache_len: int, budget: int, batch: int = 1,
                        prefetch: bool = True, evict_after_read: bool = False, poison: bool = False,
                        direct: bool = True):
    """An OffloadRunner for ``spec`` over the store in ``store`` (see runtime/offload.py)."""
    from runtime.offload import OffloadRunner

    return OffloadRunner(offload_builder(spec, cache_len, batch), Path(store), key, cache_len, spec.model.vocab,
                         budget, prefetch, evict_after_read, poison, direct)


def add_offload_args(p) -> None:
    """``--offload disk|host``, ``--memory-budget``, ``--offload-dir``, ``--no-prefetch``."""
    g = p.add_argument_group("offload (models larger than memory)")
    g.add_argument("--offload", choices=("disk", "host"),
                   help="disk: stream each layer's weights from an on-disk store through --memory-budget; "
                        "host: weights in pinned host memory, moved to the device layer by layer")
    g.add_argument("--memory-budget", help="bytes for weights with --offload disk (resident globals + the "
                                           "layer buffer pool), e.g. 200MB")
    g.add_argument("--offload-dir", type=Path, help="where the offload store lives (default: the einshard cache)")
    g.add_argument("--no-prefetch", action="store_true", help="read each layer when it is needed (no reader thread)")


def check_offload_args(args) -> int | None:
    """The budget in bytes (None without --offload disk); flags checked before anything loads."""
    off = getattr(args, "offload", None)
    if off is None:
        if getattr(args, "memory_budget", None) or getattr(args, "offload_dir", None) or getattr(args, "no_prefetch", False):
            raise SpecError("--memory-budget, --offload-dir and --no-prefetch go with --offload disk")
        return None
    if off == "host":
        if args.memory_budget:
            raise SpecError("--memory-budget is for --offload disk (host offload keeps all weights in host memory)")
        return None
    if not args.memory_budget:
        raise SpecError("--offload disk needs --memory-budget", hint="e.g. --memory-budget 200MB")
    budget = parse_size(args.memory_budget)
    if budget <= 0:
        raise SpecError(f"--memory-budget must be positive, got {args.memory_budget!r}")
    return budget


def disk_runner(args, loaded, context: int, batch: int):
    """The OffloadRunner for ``--offload disk``: the store is written first when missing."""
    spec = loaded.spec
    if spec.mesh.n_devices > 1:
        raise SpecError("--offload disk streams layers on one device; drop --mesh")
    budget = check_offload_args(args)
    assert budget is not None
    key = store_key(args.checkpoint, spec)
    directory = args.offload_dir or default_store_dir(key)
    try:
        ensure_store(spec, key, directory, lambda: checkpoint_weights(loaded.checkpoint, spec), budget)
        return make_offload_runner(spec, directory, key, context, budget, batch, prefetch=not args.no_prefetch)
    except OSError as e:
        raise FileError(f"cannot use the offload store in '{directory}': {e}",
                        hint="give --offload-dir a writable directory") from None


def score_runner(args, loaded, window: int):
    """An OffloadRunner for ``score --offload disk``: the store ``generate`` uses (same key),
    its prefill modules built with every position's logits and a KV cache of the window."""
    from compiler.generation import module_for

    spec = loaded.spec
    runner = disk_runner(args, loaded, window, 1)
    runner.build = lambda phase, b, length, context: module_for(spec, "prefill", b, length, length, logits="all")
    return runner


def checkpoint_weights(checkpoint, spec: Spec) -> Mapping:
    """The checkpoint's weights, read only when indexed (a layer at a time) where the format allows."""
    from compiler.generation import weight_types
    from runtime.checkpoint import HFCheckpoint
    from runtime.gguf import GGUFCheckpoint
    from runtime.sliced_weights import lazy_weights

    if isinstance(checkpoint, (HFCheckpoint, GGUFCheckpoint)):
        return lazy_weights(checkpoint, spec.model, weight_types(spec))
    return checkpoint.load_weights(spec.model, weight_types(spec))


def disk_generator(args, loaded, context: int, batch: int):
    """(runner, generator) for ``--offload disk``."""
    from runtime.offload import OffloadGenerator

    runner = disk_runner(args, loaded, context, batch)
    return runner, OffloadGenerator(runner)


def offload_report(runner) -> dict:
    """What streaming held and moved, for ``generate --json``."""
    st = runner.stats
    return {"budget_bytes": runner.budget, "buffers": runner.slots, "pool_bytes": runner.pool.pool_bytes,
            "resident_weight_bytes": runner.layout.globals_bytes, "layer_bytes": runner.layout.layer_bytes,
            "prefetch": runner.pool.prefetch, "layers_read": st.layers_read, "bytes_read": st.bytes_read,
            "read_s": st.read_s, "wait_s": st.wait_s}


def host_runner(loaded, context: int, batch: int):
    """The ordinary runner with per-layer weights in pinned host memory and a device_put per
    layer inside the compiled step (``--offload host``)."""
    from compiler.generation import make_runner
    from runtime.offload_host import HostOffloadBackend, place_on_host

    if loaded.spec.mesh.n_devices > 1:
        raise SpecError("--offload host moves layers to one device; drop --mesh")
    runner = make_runner(loaded.spec, loaded.weights, context, batch=batch)
    runner.backend, runner.place = HostOffloadBackend(), place_on_host
    return runner


def host_generator(loaded, context: int, batch: int):
    """(runner, generator) for ``--offload host``."""
    from runtime.generator import Generator

    runner = host_runner(loaded, context, batch)
    return runner, Generator(runner)
