"""JAX lowering: each op through the shared rule table onto jax.numpy / jax.lax, jitted.

Lowering is interpretation under tracing: the Interpreter walks the function with jnp arrays
inside ``jax.jit``, so every op becomes XLA through its rule in ``runtime/kernels.py``. Layer
bodies run in ``lax.scan`` over the stacked weights and the KV cache arguments are donated so
decode updates them in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ir.errors import LoweringError

from ir.module import Function, Module
from ir.types import TensorType
from runtime.distributed import global_array, is_lazy, to_host
from runtime.kernels import RULES, Interpreter
from runtime.projections import Layouts, Sources, permute_spec, projection, projection_letters
from runtime import batched_dots, cpu_kernels, small_rows
from runtime.batched_dots import batched_einsum
from runtime.causal_blocks import AttentionChain, blocked_values, noted_rules
from runtime import xla_options
from runtime.xla_options import function_int8

JNP_DTYPES = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16,
              "i32": jnp.int32, "i8": jnp.int8, "bool": jnp.bool_}


#: Up to this many rows, a projection of an int8/bf16 weight into f32 runs one matrix-vector
#: dot per row (see JaxBackend.einsum).
GEMV_ROWS = 8


def materialized(x: jax.Array) -> jax.Array:
    """``x`` (a ``[P, C]`` activation), computed into its own buffer before a fused int8/bf16
    matrix-vector dot. When the activation merges several IR dims (the attention output
    ``BLKGD`` read by ``wo``), XLA's CPU layout assignment may keep it physically permuted
    (the attention dot's output order) and fuses that transpose into the dot's elemental loop,
    which then recomputes the permuted index per multiply-add and is no longer vectorised (30
    int8 576 x 576 gemvs fed a [3, 64, 3] -> [3, 3, 64] transposed activation: 6x slower than
    a contiguous one, in a micro-benchmark). A copy, a ``lax.optimization_barrier`` (removed
    before fusion) or a size-2 sum (simplified to an add) are all fused back; a reduce-window is
    not loop-fusible into the dot, so this one (``x + 0``, exact) is. Cost: one 2 x C pass."""
    pad = ((0, 1),) + ((0, 0),) * x.ndim  # a zero row after x along a new leading dim
    return lax.reduce_window(x[None], jnp.zeros((), x.dtype), lax.add, (2,) + (1,) * x.ndim,
                             (1,) * (x.ndim + 1), padding=pad)[0]


def int8_dot(x: jax.Array, m: jax.Array, axes: tuple[str, ...] = ()) -> jax.Array:
    """``x[P, C] @ m[Q, C].T`` for an int8 weight ``m``, with each row of ``x`` quantized to int8
    (its own scale, max|x| / 127) and the product accumulated exactly in int32: XLA's CPU
    backend hands an int8 x int8 dot to its library (YNNPACK: VNNI/AMX kernels), 2-4x faster
    than the f32 gemv it fuses the weight's convert into at batch 1 and 4-7x at batch 8 (a
    60-layer 1536 x 576 micro-benchmark). One row is padded to two: a one-row int8 dot is
    rewritten into a matrix-vector product that converts the weight to int32 in memory. Rows
    are independent (per-row scales, exact integer sums), so a row's result does not depend on
    the batch it runs in. The caller applies the weight's per-channel scales. ``axes``: the
    mesh axes the contracted dims are sharded over (inside shard_map), whose blocks share the
    row's scale (a pmax), so a sharded program computes what one device does."""
    a = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    if axes:
        a = lax.pmax(a, tuple(axes))
    a = jnp.where(a > 0, a, 1.0)
    xq = jnp.round(x / a).astype(jnp.int8)
    if cpu_kernels.int_accepts(xq, m):  # the same exact sums, streamed faster (runtime/cpu_kernels)
        return cpu_kernels.int_rows_dot(xq, m).astype(jnp.float32) * a
    p = x.shape[0]
    if p == 1:
        xq = jnp.concatenate([xq, xq])
    y = lax.dot_general(xq, m, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return y[:p].astype(jnp.float32) * a


class JaxBackend:
    xp = jnp

    def __init__(self, precision: Any = lax.Precision.HIGHEST, mesh: dict[str, int] | None = None,
                 upcast: bool | None = None, int8_activations: bool | None = None):
        self.precision = precision
        self.mesh = dict(mesh or {})
        #: stored [out, in] weights and dequantized int8 weights met while tracing (projections.py)
        self.sources = Sources()
        #: where traced attention values came from (runtime/causal_blocks.py)
        self.attention = AttentionChain()
        #: rope cos/sin per (positions, trace, theta, rotary dim): rope_tables
        self._rope: dict[tuple, tuple] = {}
        #: bf16 projections multiply in f32 (XLA's CPU bf16 dot is 2-7x slower than f32's, and
        #: the bf16 -> f32 convert fuses into an [out, in] weight's dot); default: on CPU
        self.upcast = jax.default_backend() == "cpu" if upcast is None else upcast
        #: int8 projections quantize their activations per row and multiply int8 x int8 -> int32
        #: (int8_dot); default: on CPU, where that dot runs in the library and the weight-only
        #: form is XLA's elemental loop; one device only, so a mesh (in one process or several)
        #: keeps the IR's weights-only numerics and gives the same tokens however it is launched
        one_device = all(n <= 1 for n in self.mesh.values())
        self.int8_activations = (jax.default_backend() == "cpu" and one_device if int8_activations is None
                                 else int8_activations)

    def erf(self, x):
        return jax.scipy.special.erf(x)

    def rope_tables(self, ang, pos, key):
        """cos and sin of the rotary angles ``ang`` of positions ``pos``, computed once per
        traced program and shared by every layer's q and k: XLA fuses an elementwise cos/sin
        into each consumer, so each layer's rope recomputed them per element of q (and of k),
        8% of a 512-token prefill in a profile. Each table goes through ``materialized`` (its
        own buffer; a reduce-window is not fused into consumers). Exact: the same values.
        Cached per trace (a value from another trace, e.g. a scan body's, is not reused)."""
        trace = getattr(ang, "_trace", None)
        if trace is None:
            return jnp.cos(ang), jnp.sin(ang)
        k = (id(pos), id(trace), *key)
        hit = self._rope.get(k)
        if hit is None or hit[0] is not pos or hit[1] is not trace:
            hit = (pos, trace, materialized(jnp.cos(ang)), materialized(jnp.sin(ang)))
            self._rope[k] = hit
        return hit[2], hit[3]

    def set_rows(self, cache, new, pos):
        b = jnp.arange(cache.shape[0])[:, None]
        return cache.at[b, pos].set(new)

    def einsum(self, spec, *xs, reduce_axes: tuple[str, ...] | None = ()):
        """A projection ``PC,CQ->PQ`` or ``PC,QC->PQ`` becomes a 2-D matmul between reshapes.
        Given as a multi-dim einsum, XLA's CPU layout assignment sometimes transposes the weight
        instead of the activation (a full copy of e.g. the attention output projection on every
        decode step). A weight stored ``[out, in]`` (runtime/projections.py) is read as stored,
        an int8 one with its convert inside the dot and its scales on the product's columns.
        ``reduce_axes``: the mesh axes of the activation's contracted dims, None when the
        activation is a partial sum (then an int8 weight's product keeps f32 activations)."""
        pr = projection(spec, xs[0].shape, xs[1].shape) if len(xs) == 2 else None
        if pr is None:
            y = self._batched_einsum(spec, *xs)
            if len(xs) == 2:  # a prefill's attention in causal query blocks (runtime/causal_blocks.py)
                self.attention.note(y, "scores", (xs[0], xs[1], spec, self._batched_einsum))
                y = blocked_values(self.attention, spec, xs[0], xs[1], y, self, RULES)
            return y
        x, w = xs
        out = jnp.result_type(x.dtype, w.dtype)
        ct = jnp.float32 if self.upcast and out == jnp.bfloat16 else out
        x2 = x.reshape(pr.p[0], pr.c).astype(ct)
        src = (w, None) if pr.out_in else self.sources.out_in(w, pr.n)
        if pr.out_in and self.int8_activations and ct == jnp.float32 and reduce_axes is not None:
            src = self.sources.row_scaled(w, pr.n) or src  # an int8 head: int8_dot (weights-only keeps the IR's)
        if src is None:
            y = jnp.matmul(x2, w.reshape(pr.c, pr.q[0]).astype(ct), precision=self.precision)
            return y.astype(out).reshape(pr.p[1] + pr.q[1])
        m, scale = src[0].reshape(pr.q[0], pr.c), src[1]
        if m.dtype == jnp.int8 and self.int8_activations and ct == jnp.float32 and reduce_axes is not None:
            y = int8_dot(x2, m, reduce_axes)
        elif m.dtype == ct:  # no convert: a dot contracting both last dims (XLA CPU's library gemv/gemm)
            y = small_rows.rows_dot(x2, m, self.precision, materialized)  # 2..16 rows: weight first
        elif pr.p[0] <= GEMV_ROWS:  # the convert fuses into a matrix-vector dot of the transposed weight
            x2 = materialized(x2) if pr.n > 1 else x2
            mt = m.astype(ct).T  # (XLA CPU's matrix-matrix dot of a converted weight is 5-6x slower:
            rows = [jnp.matmul(x2[i:i + 1], mt, precision=self.precision) for i in range(pr.p[0])]
            y = rows[0] if len(rows) == 1 else jnp.concatenate(rows)  # one vector per row wins to 8)
        else:
            y = jnp.matmul(x2, m.astype(ct).T, precision=self.precision)
        if scale is not None:
            y = y * scale.reshape(pr.q[0]).astype(ct)
        return y.astype(out).reshape(pr.p[1] + pr.q[1])

    def _batched_einsum(self, spec, *xs):
        y = batched_einsum(spec, *xs, self.precision) if len(xs) == 2 and batched_dots.ENABLED else None
        return jnp.einsum(spec, *xs, precision=self.precision) if y is None else y

    def top_k(self, x, k):
        return lax.top_k(x, k)

    def scatter_rows(self, buf, i, j, rows):
        return buf.at[i, j].set(rows, mode="drop")

    def count_dropped(self, n):
        """Reported through a host callback (only emitted where a capacity can drop)."""
        from runtime.kernels_moe import DROPPED

        jax.debug.callback(DROPPED.add, n)

    def scan(self, body, carry, consts, xs):
        """``lax.scan`` over stacked layers; over per-layer lists (split_layers), a loop in the
        program that hands each layer its own buffers. XLA on CPU does not fuse the scan's
        dynamic-slice of a stacked weight into the dot that reads it: the slice is copied
        first, so every weight byte moves three times per step. Decode is memory-bound, so
        the runner keeps layers apart (see entry_program)."""
        lists = [x for x in xs if isinstance(x, list)]
        if not lists:
            def step(c, x):
                return body(c, consts, x)

            return lax.scan(step, carry, xs)
        ys_all = []
        for i in range(len(lists[0])):
            carry, ys = body(carry, consts, tuple(x[i] for x in xs))
            ys_all.append(ys)
        return carry, tuple(list(col) for col in zip(*ys_all))

    def float_dtype(self, dtype):
        return JNP_DTYPES[dtype]

    def cast(self, x, dtype):
        return x.astype(JNP_DTYPES[dtype])

    def axis_offset(self, t: TensorType, dim: str):
        axes = t.dim(dim).axes
        if not axes:
            return 0
        return lax.axis_index(axes) * (t.size(dim) // self.group_size(axes))

    # ---- collectives (valid inside shard_map) -------------------------------------------------
    def group_size(self, axes):
        n = 1
        for a in axes:
            n *= self.mesh[a]
        return n

    def psum(self, x, axes):
        return lax.psum(x, tuple(axes))

    def psum_scatter(self, x, axes, axis):
        return lax.psum_scatter(x, tuple(axes), scatter_dimension=axis, tiled=True)

    def all_gather(self, x, axes, axis):
        # the gathered value is the same on every device of the group: say so for check_vma
        return lax.all_gather(x, tuple(axes), axis=axis, tiled=True, to="invarying")

    def all_to_all(self, x, axes, split, concat):
        return lax.all_to_all(x, tuple(axes), split, concat, tiled=True)

    def axis_index(self, axes):
        return lax.axis_index(tuple(axes))

    def dynamic_slice(self, x, axis, start, size):
        return lax.dynamic_slice_in_dim(x, start, size, axis)

    def dynamic_update_slice(self, x, y, axis, start):
        return lax.dynamic_update_slice_in_dim(x, y, start, axis)

    def pmax(self, x, axes):
        return lax.pmax(x, tuple(axes))

    def ppermute(self, x, axes, shift):
        """A ring over ``axes`` in the IR's composite order (major first, as axis_index counts).
        The perm is given over the axes in mesh order, the order lax.ppermute linearizes in."""
        sizes = [self.mesh[a] for a in axes]
        mesh_order = tuple(a for a in self.mesh if a in axes)
        n = self.group_size(axes)

        def linear(i: int) -> int:
            coord = dict(zip(axes, np.unravel_index(i, sizes)))
            return int(np.ravel_multi_index([coord[a] for a in mesh_order], [self.mesh[a] for a in mesh_order]))

        return lax.ppermute(x, mesh_order, perm=[(linear(i), linear((i + shift) % n)) for i in range(n)])

    def fori_loop(self, lo, hi, body, init):
        # a real loop in the HLO (not unrolled): the collective-permutes sit in a while body
        return lax.fori_loop(lo, hi, body, init) if hi > lo else init


def partition_spec(t: TensorType) -> PartitionSpec:
    """The PartitionSpec of a (non-partial) type: one entry per dim, major axes first."""
    return PartitionSpec(*[None if not d.axes else d.axes[0] if len(d.axes) == 1 else tuple(d.axes)
                           for d in t.dims])


def make_mesh(module: Module) -> Mesh | None:
    """A jax Mesh with the module's axes over the first devices JAX offers (None: one device)."""
    if module.n_devices == 1:
        return None
    devices = jax.devices()
    n = module.n_devices
    if len(devices) < n:
        raise LoweringError(
            f"the mesh {dict(module.mesh)} needs {n} devices but JAX offers {len(devices)} "
            f"({devices[0].platform})",
            hint="on CPU, pass --devices N (or set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                 "before JAX starts)")
    shape = tuple(s for _, s in module.mesh)
    return Mesh(np.array(devices[:n]).reshape(shape), tuple(a for a, _ in module.mesh))


@dataclass
class JaxEntry:
    """A jitted entry function with its parameter order and donated cache arguments."""

    fn: Function
    jitted: Any
    mesh: Any = None

    def __call__(self, args: Mapping[str, Any]) -> tuple:
        missing = [p.name for p in self.fn.params if p.name not in args]
        if missing:
            raise KeyError(f"missing arguments for @{self.fn.name}: {', '.join(missing)}")
        return self.jitted(*[args[p.name] for p in self.fn.params])

    def lower(self, args: Mapping[str, Any]):
        return self.jitted.lower(*[args[p.name] for p in self.fn.params])


def layer_split(t: TensorType) -> bool:
    """Whether a param or result is per layer (stacked along a leading N): split_layers passes
    such values as a list of N arrays, one per layer."""
    return bool(t.dims) and t.dims[0].name == "N" and not t.dims[0].axes  # over pipeline stages: one array


def _spec(t: TensorType, split: bool) -> PartitionSpec:
    s = partition_spec(t)
    return PartitionSpec(*tuple(s)[1:]) if split and layer_split(t) else s


def entry_rules(be: Any) -> dict:
    """The interpreter rules a compiled entry runs with (the shared rules with the JAX
    backend's int8/projection/attention forms); every JAX lowering of an entry, resident or
    streamed layer by layer (runtime/offload.py), uses these, so they compute the same numbers."""
    rules = {**RULES, "dequantize": _noted_dequantize, "einsum": _sharded_einsum, "embed": _int8_embed}
    chain = getattr(be, "attention", None)
    return noted_rules(rules, chain) if isinstance(chain, AttentionChain) else rules


def entry_program(module: Module, entry: str, backend: JaxBackend | None = None,
                  split_layers: bool = False, stored: Layouts | None = None) -> tuple[Any, Mesh | None]:
    """The traceable (not jitted) program of one entry, positional in its params, and its mesh.
    On a mesh of more than one device the function runs inside ``jax.shard_map`` on per-device
    blocks, with the in/out specs read off the param and result types (``check_vma`` on).
    Callers compose it inside their own ``jax.jit`` (the generation loop, the serving step).

    ``split_layers``: per-layer params (weights, KV caches; see :func:`layer_split`) are taken,
    and per-layer results returned, as lists of N arrays, and the layer loop is unrolled over
    them, so no layer's weights or cache are sliced out of (and copied from) a stacked array.

    ``stored``: weights passed in another physical layout, ``stored = logical.transpose(perm)``
    per param (runtime/projections.py: projection weights ``[out, in]``)."""
    fn = module.function(entry)
    be = backend or JaxBackend(mesh=module.mesh_sizes)
    interp = Interpreter(module, be, entry_rules(be))
    layouts = dict(stored or {})

    def restore(a, perm, t):
        if perm is None:
            return a
        if isinstance(a, list):  # per layer: one layer's logical shape
            return [be.sources.restore(x, perm, jnp, t.shape[1:]) for x in a]
        return be.sources.restore(a, perm, jnp, t.shape)

    def program(*args):
        if layouts:
            args = tuple(restore(a, layouts.get(p.name), p.type) for p, a in zip(fn.params, args))
        return interp.call(fn, args)

    mesh = make_mesh(module)
    if mesh is not None:
        for t in fn.result_types:
            if t.partial:
                raise LoweringError(f"@{fn.name} returns a partial sum ({t}); run insert-collectives")
        # A looped collective einsum leaves every device of its ring with the same value, which the
        # IR's types state and the SPMD simulator checks, but JAX's replication tracking cannot
        # see through a ppermute ring (and has no varying->invariant cast without a collective):
        # modules with such loops run with check_vma off.
        # A pipeline schedule (runtime/kernels_pipeline.py) carries stage-varying values through its
        # loop from invariant zeros: likewise unchecked.
        looped = any(op.kind in ("collective_einsum", "pipeline", "pipeline_generate") for f in module.functions for op in f.ops)
        program = jax.shard_map(program, mesh=mesh, in_specs=tuple(permute_spec(_spec(p.type, split_layers), layouts.get(p.name))
                                                                   for p in fn.params),
                                out_specs=tuple(_spec(t, split_layers) for t in fn.result_types),
                                check_vma=not looped)
    return program, mesh


def _sharded_einsum(op, xs, ts, be, interp):
    """The shared einsum rule, telling the JAX backend the mesh axes of a projection's
    contracted activation dims (None for a partial-sum activation): int8_dot's row scales."""
    pl = projection_letters(op.spec) if len(xs) == 2 else None
    if pl is None or not isinstance(be, JaxBackend):
        return RULES["einsum"](op, xs, ts, be, interp)
    t = ts[0]
    axes = None if t.partial else tuple(a for d in t.dims[len(t.dims) - pl[0]:] for a in d.axes)
    return (be.einsum(op.spec, *xs, reduce_axes=axes),)


def _int8_embed(op, xs, ts, be, interp):
    """The shared embed rule, except for a dequantized int8 table on one device (a tied
    embedding, passes/quantize_int8.py): the gather takes the int8 rows and their scales and
    dequantizes only those (as the dequantize rule does, so the same values), instead of
    reading the dequantized table (49152 x 576 on SmolLM2) on every step."""
    src = be.sources.row_scaled(xs[0], 1) if isinstance(be, JaxBackend) and not ts[0].dim("V").axes else None
    if src is None:
        return RULES["embed"](op, xs, ts, be, interp)
    q, scale = src
    dt = xs[0].dtype
    rows = jnp.take(q, xs[1], axis=0).astype(dt)
    return (rows * jnp.take(scale, xs[1], axis=0).astype(dt)[..., None],)


def _noted_dequantize(op, xs, ts, be, interp):
    """The shared dequantize rule, with the result remembered as ``q * scale`` (for the
    projection that reads it: JaxBackend.einsum)."""
    out = RULES["dequantize"](op, xs, ts, be, interp)
    if not op.segments and isinstance(be, JaxBackend):
        be.sources.dequantized(out[0], xs[0], xs[1], op.reduce, ts[0].names)
    return out


def lower_entry(module: Module, entry: str, backend: JaxBackend | None = None) -> JaxEntry:
    """Jits one entry function of ``module`` (see :func:`entry_program`); cache params are
    donated so decode updates them in place."""
    fn = module.function(entry)
    program, mesh = entry_program(module, entry, backend)
    donate = tuple(i for i, p in enumerate(fn.params) if p.role == "cache")
    return JaxEntry(fn, xla_options.jit(program, function_int8(fn), donate_argnums=donate), mesh)


def to_device(x: np.ndarray, t: TensorType) -> jax.Array:
    return jnp.asarray(x, dtype=JNP_DTYPES[t.dtype])


class JaxExecutor:
    """Runs entries of a module with JAX, converting host arrays to the declared dtypes."""

    name = "jax"

    def __init__(self, module: Module):
        self.module = module
        fns = [*module.entries, *([module.prepare] if module.prepare is not None else [])]
        self.entries = {f.name: lower_entry(module, f.name) for f in fns}

    def prepare(self, entry: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Host arrays to device arrays, laid out as the entry's params say (so no resharding
        happens at the call); arrays already on device are passed through."""
        fn = self.module.function(entry)
        mesh = self.entries[entry].mesh
        out = {}
        for p in fn.params:
            a = args[p.name]
            if not isinstance(a, jax.Array):
                if mesh is not None and jax.process_count() > 1:  # each process builds only its shards
                    a = global_array(p.type.shape, JNP_DTYPES[p.type.dtype],
                                     NamedSharding(mesh, partition_spec(p.type)),
                                     a.__getitem__ if is_lazy(a) else np.asarray(a).__getitem__)
                    out[p.name] = a
                    continue
                if mesh is not None:  # from the host straight to the shards: placing a device array
                    # would compile a slicing program per shape and layout (seconds in the tests)
                    a = jax.device_put(np.asarray(a, dtype=JNP_DTYPES[p.type.dtype]),
                                       NamedSharding(mesh, partition_spec(p.type)))
                else:
                    a = to_device(a, p.type)
            out[p.name] = a
        return out

    def call(self, entry: str, args: Mapping[str, Any]) -> tuple:
        return self.entries[entry](self.prepare(entry, args))

    @staticmethod
    def to_host(x: Any) -> np.ndarray:
        a = to_host(x)  # gathered from every process when some shards live elsewhere
        return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a
