"""Compiled prefill and decode steps of one model at one layout, over device-resident weights.

The compiler emits one module per program shape (batch, prompt length); the runner asks its
``build`` callback for the module of each shape it is used at, lowers the entry to a traceable
JAX function, and keeps one copy of the prepared weights on device for all of them. Callers
(the generation loop, the serving engine) compose :meth:`ModelRunner.step` inside their own
``jax.jit`` with sampling and stop checks, so one compiled program does a whole iteration.

Position is data: every row carries its own positions, the causal mask is ``t > pos`` per row
and the step writes the new keys and values at ``cache[:, b, pos[b, l]]`` before attending. Rows
of different prompt lengths share one prefill through :func:`pack_prompts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ir.errors import EinshardError, SpecError
from ir.module import Function, Module
from runtime.distributed import global_array, is_lazy
from runtime.generate import prepared_weights
from runtime.lower_jax import JNP_DTYPES, JaxExecutor, _spec, entry_program, layer_split
from runtime.projections import Layouts, flat_stored, out_in_layouts, permute_spec, transpose_host

class BuildFn(Protocol):
    """build(phase, batch, length, context) -> the compiled module with that one entry
    ("prefill" with L = length, or "decode" with L = 1), its KV cache holding ``context``
    positions (None: the runner's cache_len)."""

    def __call__(self, phase: str, batch: int, length: int, context: int | None = None, /) -> Module: ...


#: One entry per cache param (k, v); each a list of N per-layer arrays [B, T, ...].
Caches = tuple[list[jax.Array], ...]
StepFn = Callable[[dict[str, jax.Array], jax.Array, jax.Array, Caches], tuple[jax.Array, Caches]]


def enable_compile_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/einshard/jax``, else ``~/.cache/einshard/jax``), so a second run of the
    same model and shapes loads its programs instead of compiling them. Returns the folder."""
    import os

    from runtime.probe import default_cache_dir

    folder = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_cache_dir() / "jax")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def bucket(n: int, least: int = 8) -> int:
    """The compiled length for ``n`` tokens: the next power of two (at least ``least``), so a new
    prompt length reuses a compiled program instead of compiling its own."""
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def pack_prompts(prompts: Sequence[Sequence[int]], length: int, start: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions [B, length] for rows of different lengths in one prefill.

    Row b's n real tokens sit at the end (columns length-n..length-1, positions s..s+n-1 where s
    is ``start[b]``, 0 by default) and the padding at the start, with positions s+n..s+length-1:
    padding writes cache rows after the prompt, which no real query can see (the mask hides
    t > pos) and which decode overwrites before any query reaches them. So column length-1 is
    every row's last prompt token, and the step's last-column logits are its next-token logits.
    """
    B = len(prompts)
    tokens = np.zeros((B, length), np.int32)
    pos = np.zeros((B, length), np.int32)
    for b, p in enumerate(prompts):
        n, s = len(p), (start[b] if start is not None else 0)
        if not 0 < n <= length:
            raise SpecError(f"prompt {b} has {n} tokens; a prefill of {length} columns takes 1..{length}")
        tokens[b, length - n:] = p
        pos[b, length - n:] = np.arange(s, s + n)
        pos[b, : length - n] = np.arange(s + n, s + length)
    return tokens, pos


def context_bucket(positions: int, cache_len: int) -> int:
    """The KV-cache length a runner compiles for ``positions`` written positions: the next power
    of two up to 64, then the next multiple of 64, at most cache_len. Shared by the resident and
    the streamed runner, so both run a request at the same program shape (with int8 x int8
    activations, attending over 16 or 64 masked positions rounds differently)."""
    n = bucket(positions) if positions <= 64 else -(-positions // 64) * 64
    return min(cache_len, n)


@dataclass
class _Compiled:
    fn: Function
    program: Any
    weight_names: tuple[str, ...]
    cache_types: tuple[Any, ...]


@dataclass
class ModelRunner:
    """Steps of one model, compiled per shape on first use; weights prepared once, on device."""

    build: BuildFn
    weights: Mapping[str, np.ndarray]
    cache_len: int
    vocab: int
    params: dict[str, jax.Array] = field(default_factory=dict)
    _compiled: dict[tuple[str, int, int, int], _Compiled] = field(default_factory=dict)
    _signature: tuple | None = None
    mesh: Any = None
    #: per-layer buffers instead of stacked ones (see runtime.lower_jax.entry_program)
    split_layers: bool = True
    #: host offload (runtime/offload_host.py): the backend the entries are lowered with, and
    #: where the prepared weights are placed (params, the entry) -> params
    backend: Any = None
    place: Callable[[dict, Function], dict] | None = None
    #: keep projection weights [out, in] on device (runtime/projections.py); the layouts chosen
    #: at the first compiled shape hold for every shape, as the weights do
    out_in: bool = True
    layouts: Layouts = field(default_factory=dict)

    def context_for(self, positions: int) -> int:
        """The compiled KV-cache length for a request that writes ``positions`` positions
        (:func:`context_bucket`). Decode attends over the whole compiled cache, so a short
        request on a long-context runner would otherwise read (and, at batch > 1, move)
        cache_len positions per layer per step."""
        return context_bucket(positions, self.cache_len)

    def valid_batch(self, batch: int) -> bool:
        """Whether the layout can run this batch (batch-sharded caches need it to divide)."""
        try:
            self._get("decode", batch, 1)
        except EinshardError:
            return False
        return True

    # ---- compiled entries ----------------------------------------------------------------
    def _get(self, phase: str, batch: int, length: int, context: int | None = None) -> _Compiled:
        ctx = self.cache_len if context is None else context
        key = (phase, batch, length, ctx)
        c = self._compiled.get(key)
        if c is not None:
            return c
        if phase not in ("prefill", "decode") or (phase == "decode" and length != 1):
            raise SpecError(f"no step {phase} of length {length}")
        if not 1 <= ctx <= self.cache_len:
            raise SpecError(f"a KV cache of {ctx} positions is outside the runner's 1..{self.cache_len}")
        if not 1 <= length <= ctx:
            raise SpecError(f"a prefill of {length} tokens does not fit the KV cache of {ctx} positions")
        module = self.build(phase, batch, length, ctx)
        fn = module.function(phase)
        if self._signature is None and self.out_in and jax.process_count() == 1:
            self.layouts = out_in_layouts(module, phase, self.split_layers)
        program, mesh = entry_program(module, phase, self.backend, split_layers=self.split_layers,
                                      stored=self.layouts)
        self.mesh = mesh
        weight_names = tuple(p.name for p in fn.params_with_role("weight"))
        sig = tuple((p.name, str(p.type)) for p in fn.params_with_role("weight"))
        if self._signature is None:
            host = prepared_weights(JaxExecutor(module), self.weights)  # through @prepare, once
            self.params = {p.name: _put(host[p.name], p.type, mesh, self.split_layers, self.layouts.get(p.name))
                           for p in fn.params_with_role("weight")}
            if self.place is not None:
                self.params = self.place(self.params, fn)
            self._signature = sig
        elif sig != self._signature:
            raise SpecError(f"the {phase} program at batch {batch}, length {length} takes other weights "
                            "than the first compiled one; fix the layout (ffn/attn) instead of auto")
        c = _Compiled(fn, (program, mesh), weight_names, tuple(p.type for p in fn.params_with_role("cache")))
        self._compiled[key] = c
        return c

    def step(self, phase: str, batch: int, length: int, context: int | None = None) -> StepFn:
        """A pure, traceable step: (params, tokens[B, L], pos[B, L], caches) -> (logits[B, V] f32
        of each row's last column, new caches), over caches of ``context`` positions (default
        cache_len). Compose it inside your own ``jax.jit``."""
        c = self._get(phase, batch, length, context)
        program, _ = c.program
        names = [p.name for p in c.fn.params]
        V = self.vocab

        def run(params: dict[str, jax.Array], tokens: jax.Array, pos: jax.Array, caches: Caches
                ) -> tuple[jax.Array, Caches]:
            env: dict[str, Any] = {**params, "tokens": tokens.astype(jnp.int32), "pos": pos.astype(jnp.int32)}
            for p, a in zip(c.fn.params_with_role("cache"), caches):
                env[p.name] = a
            outs = program(*[env[n] for n in names])
            logits = outs[0][:, -1, :V].astype(jnp.float32)
            return logits, tuple(outs[1:])

        return run

    def empty_cache(self, batch: int, context: int | None = None) -> Caches:
        """Zero KV caches for ``batch`` rows, laid out as the decode entry's cache params."""
        c = self._get("decode", batch, 1, context)
        return tuple(_put(np.zeros(t.shape, _np_dtype(t.dtype)), t, self.mesh, self.split_layers) for t in c.cache_types)

    def cache_bytes(self, batch: int, context: int | None = None) -> int:
        """Bytes of the KV caches of ``batch`` rows (all layers, all devices)."""
        c = self._get("decode", batch, 1, context)
        return sum(int(np.prod(t.shape)) * np.dtype(_np_dtype(t.dtype)).itemsize for t in c.cache_types)

    def weight_bytes(self) -> int:
        """Bytes of the prepared weights (all devices): what one decode step reads."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self.params))


def _np_dtype(dtype: str) -> Any:
    return jnp.dtype(JNP_DTYPES[dtype])


def _put(a: Any, t: Any, mesh: Any, split: bool = True, perm: tuple[int, ...] | None = None) -> Any:
    """A host array onto the device(s), as the param type lays it out; a per-layer (N-stacked)
    value becomes a list of N arrays (see runtime.lower_jax.entry_program's split_layers).
    ``perm``: stored as ``transpose(perm)`` of that (of each layer's array when split)."""
    # a lazy weight is read block by block in _put_one; a device array (made by @prepare, int8)
    # stays on device: across processes it cannot be read back whole
    x = a if is_lazy(a) or (isinstance(a, jax.Array) and not a.is_fully_addressable) else np.asarray(a)
    if layer_split(t) and split:
        return [_put_one(x[i], t, mesh, perm) for i in range(x.shape[0])]
    return _put_one(x, t, mesh, perm)


def _put_one(x: np.ndarray, t: Any, mesh: Any, perm: tuple[int, ...] | None = None) -> jax.Array:
    if mesh is not None and jax.process_count() > 1:  # each process builds only its devices' shards
        spec = _spec(t, layer_split(t) and x.ndim < len(t.dims))
        if isinstance(x, jax.Array):  # relaid out on device, by every process together
            return jax.jit(lambda y: y.astype(JNP_DTYPES[t.dtype]), out_shardings=NamedSharding(mesh, spec))(x)
        return global_array(x.shape, JNP_DTYPES[t.dtype], NamedSharding(mesh, spec), x.__getitem__)
    split = layer_split(t) and x.ndim < len(t.dims)
    flat = mesh is None and flat_stored(perm, JNP_DTYPES[t.dtype])  # projections.py: int8 wo as [Q, C]
    y = jnp.asarray(transpose_host(x, perm, flat), dtype=JNP_DTYPES[t.dtype])
    if mesh is not None:
        y = jax.device_put(y, NamedSharding(mesh, permute_spec(_spec(t, split), perm)))
    return y


def on_cpu() -> bool:
    """Whether JAX runs on the host's CPU (then the KV cache and weights live in host memory)."""
    return jax.devices()[0].platform == "cpu"


def roofline_fraction(runner: ModelRunner, step_ms: float, batch: int, context: int | None = None) -> float | None:
    """Fraction of the decode roofline a measured step reached: (weight + KV cache bytes) / the
    rate this CPU reads an array that large (runtime/probe.py ``read_bandwidth``, measured now),
    over the step. None off CPU, on a mesh (the probe measures one device) or when nothing was
    timed."""
    if step_ms <= 0 or not on_cpu() or runner.mesh is not None:
        return None
    from runtime.probe import read_bandwidth

    nbytes = runner.weight_bytes() + runner.cache_bytes(batch, context)
    return nbytes / read_bandwidth(nbytes) / (step_ms / 1e3)
