"""The engine's compiled programs, built around the runner's traceable steps, one per shape.

Each program takes the slot caches donated and returns them updated, so the KV buffer never
leaves the device: decode runs on a window of the slot buffer (sliced inside the program),
admission prefills a fresh cache and scatters its rows into chosen slots, a chunk continues
prompts in place, compaction is one gather along the slot dim. Sampling is fused into the
programs that produce logits, so only the sampled token ids come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

from runtime import cache_windows, xla_options
from runtime.xla_options import tree_int8

#: One entry per cache param (k, v): an array [N, B, T, ...] (batch on dim 1) or a list of N
#: per-layer arrays [B, T, ...] (batch on dim 0); both forms are handled, the runner picks one.
Caches = tuple[Any, ...]


def cache_map(fn: Callable[..., jax.Array], caches: Caches, *others: Caches) -> Caches:
    """``fn(leaf, *other_leaves, axis=batch_axis)`` over every cache array, keeping the form."""
    out: list[Any] = []
    for i, c in enumerate(caches):
        rest = [o[i] for o in others]
        if isinstance(c, (list, tuple)):
            out.append([fn(x, *(r[j] for r in rest), axis=0) for j, x in enumerate(c)])
        else:
            out.append(fn(c, *rest, axis=1))
    return tuple(out)


def cache_leaves(caches: Caches) -> list[tuple[jax.Array, int]]:
    """Every cache array with its batch axis."""
    out: list[tuple[jax.Array, int]] = []
    for c in caches:
        out += [(x, 0) for x in c] if isinstance(c, (list, tuple)) else [(c, 1)]
    return out


def _at(axis: int, index: Any) -> tuple:
    return (slice(None),) * axis + (index,)


def _grouped(c: jax.Array, groups: int, axis: int) -> jax.Array:
    s = c.shape
    return c.reshape(*s[:axis], groups, s[axis] // groups, *s[axis + 1:])


def take_window(c: jax.Array, groups: int, w: int, axis: int) -> jax.Array:
    """Rows ``j < w`` of every group, as a batch of ``groups * w`` (row g * w + j)."""
    if w * groups == c.shape[axis]:
        return c
    g = _grouped(c, groups, axis)[_at(axis + 1, slice(0, w))]
    return g.reshape(*c.shape[:axis], groups * w, *c.shape[axis + 1:])


def put_window(c: jax.Array, new: jax.Array, groups: int, w: int, axis: int) -> jax.Array:
    if w * groups == c.shape[axis]:
        return new.astype(c.dtype)
    g = _grouped(c, groups, axis).at[_at(axis + 1, slice(0, w))].set(_grouped(new, groups, axis).astype(c.dtype))
    return g.reshape(c.shape)


def put_positions(c: jax.Array, new: jax.Array, groups: int, w: int, pos: jax.Array, axis: int) -> jax.Array:
    """Writes back what a one-token decode step over the window changed: window row r's entry
    at position ``pos[r]`` (row r = g * w + j is slot j of group g). Writing the whole window
    back instead (``put_window``) made XLA fuse the window's read and the write of the same
    donated buffer into one loop, so it copied every cache array in full each step: a narrow
    window cost more than the full one. The barrier keeps the written values a separate buffer,
    so the scatter updates the donated cache in place."""
    W = new.shape[axis]
    r = jnp.arange(W)
    vals = jax.lax.optimization_barrier(new[_at(axis, r) + (pos,)])
    g = _grouped(c, groups, axis).at[_at(axis, r // w) + (r % w, pos)].set(vals.astype(c.dtype))
    return g.reshape(c.shape)


def window_writers(caches: Caches, win: Caches, groups: int, w: int,
                   written: dict[int, jax.Array]) -> dict[int, cache_windows.Writer]:
    """Writers (runtime/cache_windows.py) for the per-layer window arrays ``win`` of ``caches``:
    each scatters the step's new rows into its whole slot buffer (row r = g * w + j is slot
    g * S / groups + j), keeps that buffer in ``written`` and returns the window read back from
    it. Stacked caches (a layer loop slices them) get none: they keep ``put_positions``."""
    out: dict[int, cache_windows.Writer] = {}
    for c, x in zip(caches, win):
        if not isinstance(c, (list, tuple)):
            continue
        for full, part in zip(c, x):
            def write(new: jax.Array, pos: jax.Array, full: jax.Array = full, part: jax.Array = part) -> jax.Array:
                r = jnp.arange(new.shape[0])
                rows = (r // w) * (full.shape[0] // groups) + r % w
                updated = full.at[rows[:, None], pos].set(new.astype(full.dtype))
                written[id(part)] = updated
                return take_window(updated, groups, w, 0)
            out[id(part)] = write
    return out


@dataclass
class Kernels:
    """Compiled programs of one runner for an S-slot buffer in ``groups`` groups, by shape."""

    runner: Any
    slots: int
    groups: int
    sample: Callable[..., jax.Array]
    _cache: dict[tuple, Callable] = field(default_factory=dict)

    def _jit(self, fn: Callable, **kw: Any) -> Callable:
        """jax.jit of a program that reads the runner's params, with their compiler options
        (runtime/xla_options.py: int8 keeps only single dots in YNNPACK on the CPU)."""
        return xla_options.jit(fn, tree_int8(self.runner.params), **kw)

    def _get(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = build()
        return fn

    def _decode_body(self, w: int) -> Callable:
        G = self.groups
        step = self.runner.step("decode", G * w, 1)

        def fn(params, caches, tokens, pos, temp, top_k, top_p, seeds):
            if w * G == self.slots:  # the whole buffer: the step's own update is in place
                logits, new = step(params, tokens[:, None], pos[:, None], caches)
                out = cache_map(lambda c, n, axis: n.astype(c.dtype), caches, new)
                return self.sample(logits, temp, top_k, top_p, seeds, pos + 1), out
            win = cache_map(lambda c, axis: take_window(c, G, w, axis), caches)
            written: dict[int, jax.Array] = {}
            with cache_windows.windows(window_writers(caches, win, G, w, written)):
                logits, new = step(params, tokens[:, None], pos[:, None], win)
            out = cache_map(lambda c, x, n, axis: written[id(x)] if id(x) in written
                            else put_positions(c, n, G, w, pos, axis), caches, win, new)
            return self.sample(logits, temp, top_k, top_p, seeds, pos + 1), out

        return fn

    def decode(self, w: int) -> Callable:
        """(params, caches, tokens[W], pos[W], temp, top_k, top_p, seeds) -> (next[W], caches):
        one fused decode step over the window, every row at its own position."""
        return self._get(("decode", w), lambda: self._jit(self._decode_body(w), donate_argnums=(1,)))

    def prefill(self, batch: int, length: int) -> Callable:
        """(params, caches, tokens[B, L], pos[B, L], dst[B], temp, top_k, top_p, seeds,
        sample_pos[B]) -> (first[B], caches): prefill on a fresh (zero) cache made on device,
        sample each row's first token, scatter the rows into slots ``dst`` (rows with dst = S
        are padding, dropped)."""
        def build() -> Callable:
            step = self.runner.step("prefill", batch, length)
            leaves, tree = jax.tree.flatten(self.runner.empty_cache(batch))
            specs = [(x.shape, x.dtype, x.sharding) for x in leaves]
            sharded = self.runner.mesh is not None

            def zeros() -> Caches:
                z = [jnp.zeros(shape, dtype) for shape, dtype, _ in specs]
                if sharded:
                    z = [jax.lax.with_sharding_constraint(x, sh) for x, (_, _, sh) in zip(z, specs)]
                return jax.tree.unflatten(tree, z)

            def fn(params, caches, tokens, pos, dst, temp, top_k, top_p, seeds, sample_pos):
                logits, rows = step(params, tokens, pos, zeros())
                out = cache_map(lambda c, r, axis: c.at[_at(axis, dst)].set(r.astype(c.dtype), mode="drop"),
                                caches, rows)
                return self.sample(logits, temp, top_k, top_p, seeds, sample_pos), out

            return self._jit(fn, donate_argnums=(1,))
        return self._get(("prefill", batch, length), build)

    def chunk(self, batch: int, length: int) -> Callable:
        """(params, caches, src[B], tokens[B, L], pos[B, L], temp, top_k, top_p, seeds,
        sample_pos[B]) -> (next[B], caches): continues the prompts of slots ``src`` in place
        (Dynamic SplitFuse); rows with src = S are padding (they read slot 0, write nothing)."""
        return self._get(("chunk", batch, length),
                         lambda: self._jit(self._chunk_body(batch, length), donate_argnums=(1,)))

    def _chunk_body(self, batch: int, length: int) -> Callable:
        step = self.runner.step("prefill", batch, length)
        S = self.slots

        def fn(params, caches, src, tokens, pos, temp, top_k, top_p, seeds, sample_pos):
            safe = jnp.where(src < S, src, 0)
            rows = cache_map(lambda c, axis: jnp.take(c, safe, axis=axis), caches)
            logits, new = step(params, tokens, pos, rows)
            new = jax.lax.optimization_barrier(new)  # as in put_positions: no full copy of the cache
            out = cache_map(lambda c, n, axis: c.at[_at(axis, src)].set(n.astype(c.dtype), mode="drop"),
                            caches, new)
            return self.sample(logits, temp, top_k, top_p, seeds, sample_pos), out

        return fn

    def mixed(self, w: int, batch: int, length: int) -> Callable:
        """Dynamic SplitFuse in one program: (params, caches, *decode args of ``decode(w)``,
        *chunk args of ``chunk(batch, length)`` after the caches) -> (next[W], next[B], caches).

        The decode rows of the window and a prompt chunk share one compiled program, one
        dispatch and one donated cache, so a chunk costs the iteration ``length`` more tokens
        instead of a second call. The decode part runs first: a prefilling slot inside the
        window gets a junk write at its ``pos``, which the chunk (covering that position) then
        overwrites before attending. Inside, the model runs twice (at 1 and at ``length``
        columns): the IR's attention reads one cache row per batch row, so a flat ragged batch
        of both would need a new attention op."""
        def build() -> Callable:
            dec, chk = self._decode_body(w), self._chunk_body(batch, length)

            def fn(params, caches, tokens, pos, temp, top_k, top_p, seeds,
                   src, ctokens, cpos, ctemp, ctop_k, ctop_p, cseeds, sample_pos):
                nxt, caches = dec(params, caches, tokens, pos, temp, top_k, top_p, seeds)
                first, caches = chk(params, caches, src, ctokens, cpos, ctemp, ctop_k, ctop_p, cseeds, sample_pos)
                return nxt, first, caches

            return self._jit(fn, donate_argnums=(1,))
        return self._get(("mixed", w, batch, length), build)

    def compact(self) -> Callable:
        """(caches, perm[S]) -> caches with slot p holding old slot perm[p]: Flover's move map
        as one gather on device."""
        def build() -> Callable:
            def fn(caches, perm):
                return cache_map(lambda c, axis: jnp.take(c, perm, axis=axis), caches)

            return jax.jit(fn, donate_argnums=(0,))
        return self._get(("compact",), build)
