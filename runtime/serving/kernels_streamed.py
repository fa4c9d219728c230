"""The engine's programs on a runner that streams its layers from disk (runtime/offload.py).

Same interface and semantics as :class:`runtime.serving.kernels.Kernels` (decode over a window,
admission prefill scattered into slots, a chunk continued in place, compaction), but a streamed
runner cannot run a whole step inside one jit: its layers' weights arrive one at a time from a
buffer pool, and a buffer is reused only after the layer that reads it has finished. So each
program is a host loop over layers (``OffloadRunner.run_layers``) of three compiled pieces: the
ops before the layer scan, one layer wrapped with the program's cache access (the window taken
and put back, fresh rows scattered into their slots, chunk rows gathered and written back) with
that layer's slot caches donated, and the ops after the scan fused with sampling. Every request
in the fused batch shares each fetched layer, which is what amortises the fetch; a mixed
iteration (decode rows plus a prompt chunk) runs both parts on each fetched layer, so the chunk
costs no second pass over the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ir.errors import SpecError
from runtime import xla_options
from runtime.lower_jax import JNP_DTYPES
from runtime.xla_options import function_int8
from runtime.serving.kernels import Caches, Kernels, put_window, take_window


@dataclass(frozen=True)
class _Part:
    """One entry run inside a streamed program: its shape, its per-layer function (from the
    pieces: (carry, consts, weights, slot caches of the layer, *extra) -> (carry, slot caches))
    and how it reads its ``nargs`` program arguments (-> the entry's inputs, the per-layer
    extras, the four sampling arrays, the sampling positions)."""

    phase: str
    batch: int
    length: int
    wrap: Callable[[Any], Callable]
    split: Callable[..., tuple[dict, tuple, tuple, Any]]
    nargs: int


@dataclass
class StreamedKernels(Kernels):
    """Kernels of an ``OffloadRunner`` (``runner``); ``params`` arguments are ignored (the
    runner holds its resident globals and reads the rest from its store)."""

    def _program(self, key: tuple, parts: tuple[_Part, ...]) -> Callable:
        """(params, caches, *each part's arguments) -> (*each part's sampled tokens, caches): one
        pass over the streamed layers; each fetched layer runs every part in order, threading
        the layer's slot caches (donated) through them."""
        def build() -> Callable:
            r = self.runner
            ps = [r.pieces(q.phase, q.batch, q.length) for q in parts]
            names = ps[0].staged.streamed
            if any(p.staged.streamed != names for p in ps):
                raise SpecError("the streamed entries take different per-layer weights")
            i8 = function_int8(ps[0].staged.fn)
            befores = [xla_options.jit(p.before, i8) for p in ps]
            wrapped = [q.wrap(p) for q, p in zip(parts, ps)]

            def layer_fn(carries, consts, weights, slot, extras):
                out = []
                for f, c, k, e in zip(wrapped, carries, consts, extras):
                    c, slot = f(c, k, weights, slot, *e)
                    out.append(c)
                return tuple(out), slot

            layer = xla_options.jit(layer_fn, i8, donate_argnums=(3,))

            def head_of(p: Any) -> Callable:
                return xla_options.jit(lambda resident, ins, kept, carry, samp, spos:
                                       self.sample(p.logits(resident, ins, kept, carry), *samp, spos), i8)

            heads = [head_of(p) for p in ps]

            def fn(params: Any, caches: Caches, *args: Any) -> tuple:
                splits, at = [], 0
                for q in parts:
                    splits.append(q.split(*args[at:at + q.nargs]))
                    at += q.nargs
                firsts = [b(r.resident, sp[0]) for b, sp in zip(befores, splits)]
                carries = tuple(f[0] for f in firsts)
                consts = tuple(f[1] for f in firsts)
                extras = tuple(sp[1] for sp in splits)
                new = tuple(list(c) for c in caches)  # donated layer by layer: the old lists go stale

                def one(i: int, weights: tuple) -> Any:
                    nonlocal carries
                    carries, out = layer(carries, consts, weights, tuple(c[i] for c in new), extras)
                    for c, o in zip(new, out):
                        c[i] = o
                    return carries, out

                r.run_layers(names, one)
                toks = tuple(h(r.resident, sp[0], f[2], c, sp[2], sp[3])
                             for h, sp, f, c in zip(heads, splits, firsts, carries))
                return (*toks, new)

            return fn
        return self._get(key, build)

    def _decode_part(self, w: int) -> _Part:
        G = self.groups

        def wrap(p: Any) -> Callable:
            def layer(carry, consts, weights, slot):
                win = tuple(take_window(c, G, w, 0) for c in slot)
                carry, new = p.layer(carry, consts, weights, win)
                return carry, tuple(put_window(c, n, G, w, 0) for c, n in zip(slot, new))
            return layer

        def split(tokens, pos, *samp):
            pos = jnp.asarray(pos)
            return {"tokens": jnp.asarray(tokens)[:, None], "pos": pos[:, None]}, (), samp, pos + 1

        return _Part("decode", G * w, 1, wrap, split, 6)

    def _chunk_part(self, batch: int, length: int) -> _Part:
        S = self.slots

        def wrap(p: Any) -> Callable:
            def layer(carry, consts, weights, slot, src):
                safe = jnp.where(src < S, src, 0)
                carry, new = p.layer(carry, consts, weights, tuple(jnp.take(c, safe, axis=0) for c in slot))
                return carry, tuple(c.at[src].set(n.astype(c.dtype), mode="drop") for c, n in zip(slot, new))
            return layer

        def split(src, tokens, pos, temp, top_k, top_p, seeds, sample_pos):
            return ({"tokens": jnp.asarray(tokens), "pos": jnp.asarray(pos)}, (jnp.asarray(src),),
                    (temp, top_k, top_p, seeds), sample_pos)

        return _Part("prefill", batch, length, wrap, split, 8)

    def decode(self, w: int) -> Callable:
        """(params, caches, tokens[W], pos[W], temp, top_k, top_p, seeds) -> (next[W], caches)."""
        return self._program(("decode", w), (self._decode_part(w),))

    def prefill(self, batch: int, length: int) -> Callable:
        """(params, caches, tokens[B, L], pos[B, L], dst[B], temp, top_k, top_p, seeds,
        sample_pos[B]) -> (first[B], caches); rows with dst = S are padding."""
        def wrap(p: Any) -> Callable:
            shapes = [(t.shape[1:], JNP_DTYPES[t.dtype]) for t in p.cache_types]

            def layer(carry, consts, weights, slot, dst):
                carry, rows = p.layer(carry, consts, weights, tuple(jnp.zeros(s, d) for s, d in shapes))
                return carry, tuple(c.at[dst].set(n.astype(c.dtype), mode="drop") for c, n in zip(slot, rows))
            return layer

        def split(tokens, pos, dst, temp, top_k, top_p, seeds, sample_pos):
            return ({"tokens": jnp.asarray(tokens), "pos": jnp.asarray(pos)}, (jnp.asarray(dst),),
                    (temp, top_k, top_p, seeds), sample_pos)

        return self._program(("prefill", batch, length), (_Part("prefill", batch, length, wrap, split, 8),))

    def chunk(self, batch: int, length: int) -> Callable:
        """(params, caches, src[B], tokens[B, L], pos[B, L], temp, top_k, top_p, seeds,
        sample_pos[B]) -> (next[B], caches); rows with src = S are padding."""
        return self._program(("chunk", batch, length), (self._chunk_part(batch, length),))

    def mixed(self, w: int, batch: int, length: int) -> Callable:
        """(params, caches, *decode(w)'s arguments, *chunk(batch, length)'s arguments) ->
        (next[W], next[B], caches): the decode rows, then the chunk, on each fetched layer."""
        return self._program(("mixed", w, batch, length), (self._decode_part(w), self._chunk_part(batch, length)))
