"""Generation with the layers' weights streamed from disk through a fixed memory budget.

ZeRO-Inference's recipe on this machine's terms: the global weights (embedding, final norm,
head) and the KV caches stay resident; each layer's weights live in the offload store
(runtime/offload_store.py) and are read, one layer at a time, into a fixed pool of buffers
(runtime/offload_pool.py) whose size the memory budget sets. Each step is run as three compiled
pieces split at the entry's layer scan: the ops before it (the embedding), the scan body once
per layer (its KV cache slices donated, so updated in place) and the ops after it together with
sampling. A large batch makes every fetched layer serve many rows.

The pieces evaluate the same IR ops with the same rules as the resident program, layer by
layer; the tests check that the tokens equal the resident run's and Hugging Face's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ir.errors import SpecError, WeightsError
from ir.module import Function, Module
from runtime.generator import GenerateRequest, GenerateResult, pad_rows, request_shapes
from runtime.kernels import Interpreter
from runtime.lower_jax import JNP_DTYPES, JaxBackend, entry_rules
from runtime.model_runner import Caches, context_bucket
from runtime.offload_pool import LayerPool, StreamStats
from runtime.offload_store import StoreLayout, data_path, read_globals, read_layout
from runtime.sampling import SamplingArrays, SamplingParams, sample
from runtime import xla_options
from runtime.xla_options import function_int8


#: build(phase, batch, length) -> the compiled module with that one entry, its KV cache of the
#: runner's cache_len positions.
StreamBuildFn = Callable[[str, int, int, int], Module]  # (phase, batch, length, KV-cache positions)


@dataclass(frozen=True)
class StagedEntry:
    """An entry split at its (one) layer scan: the ops before, the scan, the ops after."""

    fn: Function
    body: Function
    before: tuple[Any, ...]
    scan: Any
    after: tuple[Any, ...]
    streamed: tuple[str, ...]  # entry weight params the scan takes per layer (from the store)
    caches: tuple[str, ...]  # entry cache params the scan takes per layer (resident)
    resident: tuple[str, ...]  # other entry weight params (global, resident)


def stage_entry(module: Module, entry: str) -> StagedEntry:
    """Splits ``entry``; SpecError when it cannot be streamed (no scan, several, a mesh)."""
    if module.n_devices != 1:
        raise SpecError("--offload runs on one device; drop --mesh")
    fn = module.function(entry)
    idx = [i for i, op in enumerate(fn.ops) if op.kind == "scan"]
    if len(idx) != 1:
        raise SpecError(f"@{entry} has {len(idx)} layer scans; streaming needs exactly one")
    scan = fn.ops[idx[0]]
    roles = {p.name: p.role for p in fn.params}
    xs = scan.operands[scan.carry + scan.consts:]
    streamed = tuple(x for x in xs if roles.get(x) == "weight")
    caches = tuple(x for x in xs if roles.get(x) == "cache")
    if len(streamed) + len(caches) != len(xs):
        raise SpecError(f"@{entry}'s layer scan takes per-layer values that are neither weights nor caches")
    resident = tuple(p.name for p in fn.params_with_role("weight") if p.name not in streamed)
    return StagedEntry(fn, module.function(scan.body.name), tuple(fn.ops[: idx[0]]), scan,
                       tuple(fn.ops[idx[0] + 1:]), streamed, caches, resident)


def _run_ops(interp: Interpreter, ops: Sequence[Any], env: dict[str, Any], types: dict) -> None:
    for op in ops:
        outs = interp.rules[op.kind](op, [env[o] for o in op.operands], [types[o] for o in op.operands],
                                     interp.be, interp)
        env.update(zip(op.results, outs))


@dataclass(frozen=True)
class StreamPieces:
    """The traceable pieces of one streamed entry, for callers that compose them in their own
    jitted functions (the serving engine's kernels wrap ``layer`` with their cache access)."""

    staged: StagedEntry
    #: (resident, inputs) -> (scan carry, scan consts, values the ops after the scan use)
    before: Callable[[dict, dict], tuple[tuple, tuple, tuple]]
    #: (carry, consts, weights_i, caches_i) -> (carry, new caches_i): one layer
    layer: Callable[[tuple, tuple, tuple, tuple], tuple[tuple, tuple]]
    #: (resident, inputs, kept, carry) -> logits [B, V] f32 of each row's last column
    logits: Callable[[dict, dict, tuple, tuple], jax.Array]
    #: (resident, inputs, kept, carry) -> the entry's first result (every column's logits when
    #: the module was built with ``logits = all``)
    outputs: Callable[[dict, dict, tuple, tuple], jax.Array]
    cache_types: tuple[Any, ...]


def stream_pieces(module: Module, phase: str, vocab: int,
                  perms: Mapping[str, tuple[int, ...]] | None = None) -> StreamPieces:
    """Splits ``module``'s ``phase`` entry at its layer scan into traceable pieces. ``perms``:
    weights given as ``logical.transpose(perm)`` (the store's [out, in] projections), read
    as the resident program reads them (runtime/projections.py), so the numbers are its own.

    The pieces run the resident program's rules (lower_jax.entry_rules). Values made from the
    resident weights alone (a dequantized int8 tied table) are made again in each piece that
    reads them rather than passed between pieces: the rules recognise them by where they came
    from while tracing (the head's int8_dot over the table's int8 rows and row scales), which a
    value crossing a jit boundary loses."""
    st = stage_entry(module, phase)
    be = JaxBackend()
    interp = Interpreter(module, be, entry_rules(be))
    perm = dict(perms or {})

    def restore(name: str, a: Any) -> Any:
        return a if perm.get(name) is None else be.sources.restore(a, perm[name], jnp)

    def global_env(resident: dict) -> dict:
        return {k: restore(k, v) for k, v in resident.items()}
    types = st.fn.value_types
    sc = st.scan
    carry_in = sc.operands[: sc.carry]
    consts_in = sc.operands[sc.carry: sc.carry + sc.consts]
    carry_out = sc.results[: sc.carry]
    made_before = {r for op in st.before for r in op.results}
    made_global: set[str] = set(st.resident)
    global_ops = []  # ops of the resident weights alone: run again in the pieces after the scan
    for op in st.before:
        if all(o in made_global for o in op.operands):
            global_ops.append(op)
            made_global.update(op.results)
    kept = tuple(dict.fromkeys(o for op in st.after for o in op.operands
                               if o in made_before and o not in made_global))
    if any(o in sc.results[sc.carry:] for op in st.after for o in op.operands):
        raise SpecError(f"@{phase} uses per-layer scan results after the scan; streaming cannot split it")

    def before(resident: dict, inputs: dict) -> tuple[tuple, tuple, tuple]:
        env = {**global_env(resident), **inputs}
        _run_ops(interp, st.before, env, types)
        return (tuple(env[n] for n in carry_in), tuple(env[n] for n in consts_in), tuple(env[n] for n in kept))

    def layer(carry: tuple, consts: tuple, weights: tuple, caches: tuple) -> tuple[tuple, tuple]:
        weights = tuple(restore(n, w) for n, w in zip(st.streamed, weights))
        outs = interp.call(st.body, (*carry, *consts, *weights, *caches))
        return tuple(outs[: sc.carry]), tuple(outs[sc.carry:])

    def outputs(resident: dict, inputs: dict, kept_vals: tuple, carry: tuple) -> jax.Array:
        env = {**global_env(resident), **inputs, **dict(zip(kept, kept_vals)), **dict(zip(carry_out, carry))}
        _run_ops(interp, global_ops, env, types)
        _run_ops(interp, st.after, env, types)
        return env[st.fn.returns[0]]

    def logits(resident: dict, inputs: dict, kept_vals: tuple, carry: tuple) -> jax.Array:
        return outputs(resident, inputs, kept_vals, carry)[:, -1, :vocab].astype(jnp.float32)

    cache_types = tuple(p.type for p in st.fn.params_with_role("cache"))
    return StreamPieces(st, before, layer, logits, outputs, cache_types)


@dataclass
class _Step:
    """The compiled pieces of one (phase, batch, length)."""

    staged: StagedEntry
    before: Any  # jitted or compiled: (resident, inputs) -> scan carry, consts, values the ops after use
    layer: Any  # (carry, consts, weights_i, caches_i) -> (carry, new caches_i)
    after: Any  # (resident, inputs, kept, carry, samp, first_pos) -> next tokens [B]
    cache_types: tuple[Any, ...]


def _compile_step(p: StreamPieces, greedy: bool) -> _Step:
    def after(resident: dict, inputs: dict, kept_vals: tuple, carry: tuple, samp: tuple,
              first_pos: jax.Array) -> jax.Array:
        temperature, top_k, top_p, seed = samp
        return sample(p.logits(resident, inputs, kept_vals, carry), temperature, top_k, top_p, seed, first_pos,
                      greedy_only=greedy)

    i8 = function_int8(p.staged.fn)
    return _Step(p.staged, xla_options.jit(p.before, i8), xla_options.jit(p.layer, i8, donate_argnums=(3,)),
                 xla_options.jit(after, i8), p.cache_types)


def _sds(t: Any, per_layer: bool = False) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(t.shape[1:] if per_layer else t.shape), JNP_DTYPES[t.dtype])


def _aot(s: _Step, resident: dict, batch: int, layout: StoreLayout) -> _Step:
    """The step with its three pieces compiled ahead of time (XLA compile outside the timed
    loop), from the shapes alone: the entry's params and the store's (stored) weight shapes,
    eval_shape through the pieces."""
    fn = s.staged.fn
    types = {p.name: p.type for p in fn.params}
    inputs = {p.name: _sds(p.type) for p in fn.params_with_role("input")}
    res = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in resident.items()}
    carry, consts, kept = jax.eval_shape(s.before, res, inputs)
    slots = {sl.name: sl for sl in layout.layer}
    weights = tuple(jax.ShapeDtypeStruct(slots[n].shape, JNP_DTYPES[types[n].dtype]) for n in s.staged.streamed)
    caches = tuple(_sds(types[n], True) for n in s.staged.caches)
    samp = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in SamplingArrays.of([SamplingParams()] * batch).as_tuple())
    first = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return _Step(s.staged, s.before.lower(res, inputs).compile(), s.layer.lower(carry, consts, weights, caches).compile(),
                 s.after.lower(res, inputs, kept, carry, samp, first).compile(), s.cache_types)


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return f"{int(n)}B"


def budget_slots(budget: int, layout: StoreLayout) -> int:
    """Layer buffers that fit the budget after the resident global weights (at least one)."""
    room = budget - layout.globals_bytes
    n = room // layout.layer_bytes
    if n < 1:
        need = layout.globals_bytes + layout.layer_bytes
        raise SpecError(f"a memory budget of {fmt_bytes(budget)} does not hold the resident weights "
                        f"({fmt_bytes(layout.globals_bytes)}) and one layer ({fmt_bytes(layout.layer_bytes)})",
                        hint=f"give --memory-budget of at least {fmt_bytes(need)} ({need} bytes); "
                             f"two layers' worth more lets the reader prefetch")
    return int(min(n, layout.layers))


@dataclass
class OffloadRunner:
    """Prefill and decode with streamed layers; compiled pieces cached per shape."""

    build: StreamBuildFn
    store: Path
    key: str
    cache_len: int
    vocab: int
    budget: int
    prefetch: bool = True
    evict_after_read: bool = False
    poison: bool = False
    direct: bool = True  # O_DIRECT reads (runtime/offload_pool.py)
    overlap_dispatch: bool = True  # dispatch layer i+1 before blocking on layer i (needs 2 buffers)
    _steps: dict[tuple, _Step] = field(default_factory=dict)
    _pieces: dict[tuple, StreamPieces] = field(default_factory=dict)
    mesh: Any = None  # one device (the ModelRunner interface reports callers read)

    def __post_init__(self) -> None:
        self.layout = read_layout(self.store, self.key)
        self.slots = budget_slots(self.budget, self.layout)
        # device_put of the aligned block's views is zero-copy on CPU (jnp.asarray would copy:
        # two copies of the embedding at load)
        self.resident = {k: jax.device_put(v) for k, v in read_globals(self.store, self.layout).items()}
        self.pool = self._new_pool()

    def _new_pool(self) -> LayerPool:
        return LayerPool(data_path(self.store), self.layout, self.slots, self.prefetch and self.slots > 1,
                         self.evict_after_read, self.poison, self.direct)

    @property
    def stats(self) -> StreamStats:
        return self.pool.stats

    def close(self) -> None:
        self.pool.close()

    @property
    def params(self) -> dict[str, jax.Array]:
        """No device parameters: the ModelRunner interface's ``params`` (which the serving engine
        hands its kernels) is empty; the streamed kernels read the resident globals and the store."""
        return {}

    def valid_batch(self, batch: int) -> bool:
        """One device: every batch runs."""
        return batch >= 1

    def context_for(self, positions: int) -> int:
        """The KV-cache length for a request writing ``positions`` positions, as ModelRunner's."""
        return context_bucket(positions, self.cache_len)

    def pieces(self, phase: str, batch: int, length: int, context: int | None = None) -> StreamPieces:
        """The traceable pieces of ``phase`` at this shape over ``context`` cache positions
        (default cache_len), checked against the store, cached."""
        ctx = self.cache_len if context is None else context
        if not 1 <= ctx <= self.cache_len:
            raise SpecError(f"a KV cache of {ctx} positions is outside the runner's 1..{self.cache_len}")
        key = (phase, batch, length, ctx)
        if key not in self._pieces:
            p = stream_pieces(self.build(phase, batch, length, ctx), phase, self.vocab, dict(self.layout.perms))
            if tuple(p.staged.caches) != tuple(q.name for q in p.staged.fn.params_with_role("cache")):
                raise SpecError(f"@{phase}: every KV cache must be a per-layer operand of the layer scan")
            names = {sl.name for sl in self.layout.layer}
            missing = [n for n in p.staged.streamed if n not in names]
            missing += [k for k in p.staged.resident if k not in self.resident]
            if missing:
                raise WeightsError(f"the offload store lacks weights the {phase} program takes: {', '.join(missing)}")
            self._pieces[key] = p
        return self._pieces[key]

    def step_fns(self, phase: str, batch: int, length: int, greedy: bool, context: int | None = None) -> _Step:
        ctx = self.cache_len if context is None else context
        key = (phase, batch, length, greedy, ctx)
        if key not in self._steps:
            self._steps[key] = _aot(_compile_step(self.pieces(phase, batch, length, ctx), greedy), self.resident, batch,
                                     self.layout)
        return self._steps[key]

    def empty_cache(self, batch: int, context: int | None = None) -> Caches:
        """Zero KV caches as ModelRunner lays them out: per cache param, a list of per-layer
        [B, T, ...] arrays of ``context`` positions (default cache_len)."""
        p = self.pieces("decode", batch, 1, context)
        return tuple([jnp.zeros(t.shape[1:], JNP_DTYPES[t.dtype]) for _ in range(self.layout.layers)]
                     for t in p.cache_types)

    def cache_bytes(self, batch: int, context: int | None = None) -> int:
        """Bytes of the resident KV caches of ``context`` positions (default cache_len)."""
        p = self.pieces("decode", batch, 1, context)
        return sum(int(np.prod(t.shape)) * jnp.dtype(JNP_DTYPES[t.dtype]).itemsize for t in p.cache_types)

    def run_layers(self, names: Sequence[str], layer: Callable[[int, tuple[jax.Array, ...]], Any]) -> None:
        """Calls ``layer(i, weights_i)`` for i = 0..N-1 with the weights ``names`` of layer i read
        from the pool; blocks on what it returns before the layer's buffer is reused (on CPU the
        weights alias the buffer). After a failure the pool is restarted (its reader ran ahead)."""
        slots = self.layout.layer
        # with two buffers or more, layer i+1 is dispatched before blocking on layer i, so the
        # host's per-layer work (acquire, views, dispatch) overlaps layer i's compute
        lag = self.overlap_dispatch and self.pool.prefetch and self.pool.slots > 1
        pending: tuple[int, Any] | None = None
        try:
            for i in range(self.layout.layers):
                buf = self.pool.acquire(i)
                views = {sl.name: sl.view(buf) for sl in slots}
                # device_put of an aligned host buffer is zero-copy on CPU: the layer reads the pool
                weights = tuple(jax.device_put(views[n]) for n in names)
                out = layer(i, weights)
                if pending is not None:
                    jax.block_until_ready(pending[1])
                    self.pool.release(pending[0])
                pending = (i, out)
                if not lag:
                    jax.block_until_ready(out)
                    self.pool.release(i)
                    pending = None
            if pending is not None:
                jax.block_until_ready(pending[1])
                self.pool.release(pending[0])
        except BaseException:
            self.pool.close()
            self.pool = self._new_pool()
            raise

    def forward(self, s: _Step, inputs: dict, caches: Caches, samp: tuple, first_pos: jax.Array) -> jax.Array:
        """One pass over every layer; ``caches`` (ModelRunner's form) are replaced in place in
        their per-layer lists."""
        carry, consts, kept = s.before(self.resident, inputs)

        def layer(i: int, weights: tuple) -> Any:
            nonlocal carry
            carry, new = s.layer(carry, consts, weights, tuple(c[i] for c in caches))
            for c, n in zip(caches, new):
                c[i] = n
            return carry, new

        self.run_layers(s.staged.streamed, layer)
        return s.after(self.resident, inputs, kept, carry, samp, first_pos)

    def weight_bytes(self) -> int:
        return self.layout.globals_bytes + self.layout.layers * sum(sl.nbytes for sl in self.layout.layer)


class OffloadGenerator:
    """Batch generation over an OffloadRunner: the Generator's semantics, one host call per layer."""

    def __init__(self, runner: OffloadRunner):
        self.runner = runner

    def compile(self, req: GenerateRequest, batch: int | None = None, stream: bool = False) -> float:
        """Compiles the pieces ``generate`` runs for ``req``; the seconds it took."""
        r = self.runner
        t0 = time.perf_counter()
        B, L, ctx = self._shapes(req, batch)
        g = all(p.greedy for p in req.params)
        r.step_fns("prefill", B, L, g, ctx)
        if max(req.max_new_tokens) > 1:
            r.step_fns("decode", B, 1, g, ctx)
        return time.perf_counter() - t0

    def _shapes(self, req: GenerateRequest, batch: int | None) -> tuple[int, int, int]:
        """(batch, prompt bucket, KV-cache positions): the Generator's shapes for ``req``, so a
        streamed request runs the resident one's program shape and gives its tokens."""
        B, L, _, ctx = request_shapes(self.runner, req, batch)
        return B, L, ctx

    def generate(self, req: GenerateRequest, stream: Callable[[int, int], bool | None] | None = None,
                 batch: int | None = None) -> GenerateResult:
        """As Generator.generate: ``stream(row, token)`` sees each token; a true return stops the row."""
        r = self.runner
        n = len(req.prompts)
        B, L, ctx = self._shapes(req, batch)
        tokens, pos, lens, limit, samp = pad_rows(req, B, L)
        eos = np.array(req.eos_ids, np.int32)
        g = all(p.greedy for p in req.params)

        t0 = time.perf_counter()
        caches = r.empty_cache(B, ctx)
        pre = r.step_fns("prefill", B, L, g, ctx)
        first = np.asarray(r.forward(pre, {"tokens": jnp.asarray(tokens), "pos": jnp.asarray(pos)}, caches, samp,
                                     jnp.asarray(lens)))
        ttft = time.perf_counter() - t0
        out = [[int(first[b])] for b in range(B)]
        count: np.ndarray = np.ones(B, np.int32)
        done = (count >= limit) | np.isin(first, eos)
        if stream is not None:
            for b in range(n):
                if stream(b, out[b][0]):
                    done[b] = True
        tok: np.ndarray = first.astype(np.int32)
        at: np.ndarray = lens.copy()  # each row's position of ``tok``
        dec = r.step_fns("decode", B, 1, g, ctx) if not done.all() else None
        steps: list[float] = []
        t1 = time.perf_counter()
        while not done.all():
            ts = time.perf_counter()
            assert dec is not None
            nxt = np.asarray(r.forward(dec, {"tokens": jnp.asarray(tok[:, None]), "pos": jnp.asarray(at[:, None])},
                                       caches, samp, jnp.asarray(at + 1)))
            steps.append((time.perf_counter() - ts) * 1e3)
            live = ~done
            tok = np.where(live, nxt, tok).astype(np.int32)
            at = np.where(live, at + 1, at).astype(np.int32)
            count = count + live
            done = done | (live & ((count >= limit) | np.isin(nxt, eos)))
            for row in np.flatnonzero(live).tolist():
                out[row].append(int(nxt[row]))
                if stream is not None and row < n and stream(row, int(nxt[row])):
                    done[row] = True
        decode_s = time.perf_counter() - t1
        eos_set = set(req.eos_ids)
        reasons = ["eos" if o and o[-1] in eos_set else "length" for o in out[:n]]
        return GenerateResult(out[:n], reasons, [len(q) for q in req.prompts], ttft, decode_s, steps, B, L)


def write_offload_store(module: Module, prepared: dict[str, Any], directory: str | Path, key: str) -> StoreLayout:
    """Writes the prepared weights of ``module``'s decode entry to a store in ``directory``, in
    the dtypes and stored layouts the resident runner uses (runtime/offload_convert.py)."""
    from runtime.offload_convert import write_prepared

    return write_prepared(module, prepared, directory, key)


def stream_logits(runner: OffloadRunner) -> Callable[[np.ndarray], np.ndarray]:
    """``logits_of`` for runtime.scoring.score_with with the layers streamed: every position's
    logits [L, V] of a fresh prefill of ``tokens`` [1, L]. The runner's ``build`` must give
    prefill modules with ``logits = all``; each layer's KV cache is zeros made inside its
    program and dropped (scoring attends only within the window)."""
    progs: dict[int, tuple[StreamPieces, Any, Any, Any]] = {}

    def logits_of(tokens: np.ndarray) -> np.ndarray:
        L = int(tokens.shape[1])
        if L not in progs:
            p = runner.pieces("prefill", 1, L)
            shapes = [(t.shape[1:], JNP_DTYPES[t.dtype]) for t in p.cache_types]

            def layer(carry: tuple, consts: tuple, weights: tuple, p: StreamPieces = p) -> tuple:
                return p.layer(carry, consts, weights, tuple(jnp.zeros(s, d) for s, d in shapes))[0]

            i8 = function_int8(p.staged.fn)
            progs[L] = (p, xla_options.jit(p.before, i8), xla_options.jit(layer, i8), xla_options.jit(p.outputs, i8))
        p, before, layer_fn, outputs = progs[L]
        ins = {"tokens": jnp.asarray(tokens, jnp.int32), "pos": jnp.arange(L, dtype=jnp.int32)[None, :]}
        carry, consts, kept = before(runner.resident, ins)

        def one(i: int, weights: tuple) -> Any:
            nonlocal carry
            carry = layer_fn(carry, consts, weights)
            return carry

        runner.run_layers(p.staged.streamed, one)
        return np.asarray(outputs(runner.resident, ins, kept, carry))[0, :, :runner.vocab]

    return logits_of
