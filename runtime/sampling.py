"""Token sampling on device: greedy, temperature, top-k, top-p, with per-row parameters.

Everything here is traceable, so sampling runs inside the compiled step and the logits never
leave the device. The order of the warpers is Hugging Face's (temperature, then top-k, then
top-p). Top-k keeps every logit equal to the k-th largest, as Hugging Face does; top-p keeps the
smallest set of largest tokens whose probability reaches ``top_p`` (at least one) and, unlike
Hugging Face (which keeps whichever tied token its sort puts first), every token tied with the
smallest one kept: exact ties at the cut-off are the only place the two differ.

A row's random key is ``fold_in(PRNGKey(seed), position)`` of the token being sampled, so a
request's tokens depend on its own seed and positions only: not on its batch, its slot, the
iteration it ran in, or the layout. That is what lets the serving engine promise the same
tokens as a request generated alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ir.errors import SpecError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature = 0`` is greedy; ``top_k = 0`` and
    ``top_p = 1`` are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SpecError(f"temperature must be >= 0, got {self.temperature}", hint="0 means greedy")
        if isinstance(self.top_k, bool) or self.top_k < 0:
            raise SpecError(f"top_k must be >= 1 (or 0 for off), got {self.top_k}")
        if not np.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise SpecError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise SpecError(f"seed must be in [0, 2^32), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SamplingArrays:
    """Per-row parameters as device-ready arrays (one row per sequence in the batch)."""

    temperature: np.ndarray  # [B] f32
    top_k: np.ndarray  # [B] i32
    top_p: np.ndarray  # [B] f32
    seed: np.ndarray  # [B] u32

    @staticmethod
    def of(params: Sequence[SamplingParams]) -> "SamplingArrays":
        return SamplingArrays(
            np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array([p.seed for p in params], np.uint32),
        )

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        return (self.temperature, self.top_k, self.top_p, self.seed)


def warp(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Hugging Face's logits warpers for sampled rows: [B, V] -> [B, V] with removed tokens at
    -inf. ``temperature`` must be > 0 here (greedy rows are decided before)."""
    x = logits / temperature[:, None]
    V = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # [B, V], largest first
    # top-k: drop everything below the k-th largest (ties with it stay)
    k = jnp.clip(top_k, 1, V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
    # top-p over what top-k kept: in ascending order, drop the prefix whose mass is <= 1 - p
    desc = jnp.where((top_k[:, None] > 0) & (desc < kth), -jnp.inf, desc)
    asc = desc[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    drop = cum <= (1.0 - top_p)[:, None]
    drop = drop.at[:, -1].set(False)  # the largest always stays
    # the smallest kept logit is the threshold (ties with it stay, as under top-k)
    kept = jnp.where(drop, jnp.inf, asc)
    threshold = kept.min(axis=-1, keepdims=True)
    return jnp.where((top_p[:, None] < 1.0) & (x < threshold), -jnp.inf, x)


def row_keys(seed: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row: the request's seed folded with the sampled token's position."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, positions)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seed: jax.Array, positions: jax.Array, greedy_only: bool = False) -> jax.Array:
    """Next token per row ([B] int32) from ``logits`` [B, V]. Rows with temperature 0 take the
    argmax; the sort that top-k/top-p need runs only when some row samples. ``greedy_only``
    (static) leaves the sampling branch out of the program when the caller knows every row is
    greedy: the same tokens, seconds less to compile."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return greedy

    def sampled(_: None) -> jax.Array:
        t = jnp.where(temperature > 0, temperature, 1.0)
        x = warp(logits, t, top_k, top_p)
        keys = row_keys(seed, positions)
        drawn = jax.vmap(lambda k, r: jax.random.categorical(k, r))(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
