"""The paper's layouts as data: where each weight, cache and the residual stream live.

A layout names mesh *roles* X, Y, Z: the module's mesh axes in order (a 2-axis mesh has no Z,
a 1-axis mesh only X). From them it derives

* weight shardings by dim letter — 1D weight-stationary splits F (and heads) over all axes;
  2D and the weight-gathered layouts share one storage, E over X and F/heads over Z then Y
  (Y minor, so that XY-WG can gather it as a suffix);
* the residual stream at rest: E over all axes (weight-stationary) or batch over X / XY / XYZ
  with E over the rest (weight-gathered);
* grouped-query heads K x G jointly: K over the longest prefix of the head axes it divides, G
  over the rest (``head_split``); ``padded_heads`` is the smallest zero-padding that makes
  them divide (pad-heads applies it);
* the KV cache: heads as the attention weights (``heads``) or batch over all axes (``batch``;
  a smaller batch over the longest prefix of them it divides, at least part of the first:
  ``split_for_batch`` divides that axis into sub-axes when the batch does not fill it);
* whether einsums keep weights still (WS) or gather them to the activations (WG).

Everything else is derived by propagation (passes/shard.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir.errors import LayoutError
from ir.types import Dim, TensorType

FFN_LAYOUTS = ("1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz")
ATTN_LAYOUTS = ("heads", "batch")


@dataclass(frozen=True)
class Layout:
    ffn: str
    attn: str
    mesh: tuple[tuple[str, int], ...]
    #: The mesh axes of each role X, Y, Z; empty: one axis each, in mesh order. A role holds two
    #: axes after :func:`split_for_batch` divided one (x=8 -> x=4 x x_1=2).
    roles: tuple[tuple[str, ...], ...] = ()
    #: Mixture of experts: the mesh axes the expert dim X is sharded over (expert parallelism);
    #: the other axes slice each expert's F (expert slicing). See :func:`expert_weight_axes`.
    experts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ffn not in FFN_LAYOUTS:
            raise LayoutError(f"unknown ffn layout {self.ffn!r}; valid: {', '.join(FFN_LAYOUTS)} "
                              "(auto is resolved by the cost model before sharding)")
        if self.attn not in ATTN_LAYOUTS:
            raise LayoutError(f"unknown attention layout {self.attn!r}; valid: {', '.join(ATTN_LAYOUTS)}")
        unknown = [a for a in self.experts if a not in self.sizes]
        if unknown or len(set(self.experts)) != len(self.experts):
            raise LayoutError(f"expert axes {'+'.join(self.experts)} must be distinct axes of the mesh "
                              f"({', '.join(self.sizes) or 'one device'})",
                              hint="set serve.expert_axes to mesh axes joined by '+' or ',' (or auto / none)")
        if len(self.roles or self.mesh) > 3:
            raise LayoutError(f"the paper's layouts use at most 3 mesh axes (x, y, z); this mesh has "
                              f"{len(self.mesh)}: {', '.join(a for a, _ in self.mesh)}")

    # ---- mesh roles ------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    def role(self, r: str) -> tuple[str, ...]:
        groups = self.roles or tuple((a,) for a, _ in self.mesh)
        i = "XYZ".index(r)
        return groups[i] if i < len(groups) else ()

    @property
    def all_axes(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.mesh)

    @property
    def weights_move(self) -> bool:
        return self.ffn.startswith("wg-")

    # ---- shardings ---------------------------------------------------------------------------
    def wide(self) -> tuple[str, ...]:
        """Axes of the 'wide' weight dims (F, heads): all axes in 1D, Z then Y otherwise."""
        if self.ffn == "1d-ws":
            return self.all_axes
        return self.role("Z") + self.role("Y")

    def narrow(self) -> tuple[str, ...]:
        """Axes of E in the weights: none in 1D, X otherwise."""
        return () if self.ffn == "1d-ws" else self.role("X")

    def batch_axes(self) -> tuple[str, ...]:
        return {"wg-x": self.role("X"), "wg-xy": self.role("X") + self.role("Y"),
                "wg-xyz": self.all_axes}.get(self.ffn, ())

    def prefer(self) -> dict[str, tuple[str, ...]]:
        """Where a pending partial sum would best land: with attn=batch, on the cache's batch
        sharding (the keys and values of the new tokens go there next)."""
        if self.attn != "batch":
            return {}
        b = self.batch_axes()
        if self.weights_move:
            return {"B": b + tuple(a for a in self.all_axes if a not in b)}
        return {"B": self.wide() + self.narrow()}

    def rest(self) -> dict[str, tuple[str, ...]]:
        """Residual stream [B, L, E] between layers."""
        b = self.batch_axes()
        return {"B": b, "E": tuple(a for a in self.all_axes if a not in b)}


def split_for_batch(layout: Layout, batch: int) -> Layout:
    """``attn = batch`` with a batch that does not divide the first axis of the KV cache's batch
    order: that axis becomes two sub-axes, a reshape of the device mesh (x=8 -> x=4 major, x_1=2
    minor, for batch 4), so the cache's batch shards over the major one (gcd(batch, size)
    devices) and replicates over the minor; every other sharding spans both, as it spanned the
    axis. Unchanged when the batch divides the axis or shares no factor with it, and in the
    weight-gathered layouts."""
    if layout.attn != "batch" or layout.roles or layout.weights_move:
        return layout  # weight-gathered: the residual stream needs the batch over all of X anyway
    order = layout.prefer()["B"]
    if not order:
        return layout
    a = order[0]
    size = layout.sizes[a]
    g = math.gcd(batch, size)
    if g in (1, size):
        return layout
    names = {n for n, _ in layout.mesh}
    sub = next(f"{a}_{i}" for i in range(1, len(names) + 2) if f"{a}_{i}" not in names)
    mesh = tuple(m for n, s in layout.mesh for m in (((n, g), (sub, size // g)) if n == a else ((n, s),)))
    roles = tuple((n, sub) if n == a else (n,) for n, _ in layout.mesh)
    return Layout(layout.ffn, layout.attn, mesh, roles, layout.experts)


def _fits(size: int, axes: tuple[str, ...], sizes: dict[str, int]) -> bool:
    return size % math.prod(sizes[a] for a in axes) == 0


def with_axes(t: TensorType, axes: dict[str, tuple[str, ...]]) -> TensorType:
    return TensorType(t.dtype, tuple(Dim(d.name, d.size, axes.get(d.name, ())) for d in t.dims), t.partial)


def require_fit(what: str, t: TensorType, axes: dict[str, tuple[str, ...]], sizes: dict[str, int],
                options: str) -> None:
    for dim, ax in axes.items():
        if t.has(dim) and ax and not _fits(t.size(dim), ax, sizes):
            n = math.prod(sizes[a] for a in ax)
            raise LayoutError(
                f"{what}: dim {dim}={t.size(dim)} does not divide over {{{','.join(ax)}}} ({n} devices)",
                hint=options)


@dataclass(frozen=True)
class HeadSplit:
    """Where grouped-query heads go: K/V heads over ``k`` (a prefix of the head axes), the query
    heads of each group over ``g`` (the rest), so that K x G is sharded jointly over all of them."""

    k: tuple[str, ...] = ()
    g: tuple[str, ...] = ()


def head_split(layout: Layout, kv_heads: int, kv: str = "shard") -> HeadSplit:
    """K over the longest prefix of the head axes it divides (none with ``kv = replicate``), G
    over the rest; a G that does not divide them is the caller's LayoutError (or pad-heads')."""
    wide = layout.wide()
    k = () if kv == "replicate" else dividing_prefix(kv_heads, wide, layout.sizes)
    return HeadSplit(k, wide[len(k):])


def padded_heads(layout: Layout, kv_heads: int, groups: int) -> tuple[int, int]:
    """The smallest zero-padding (K', G') >= (K, G) of grouped-query heads that divides the head
    axes as :func:`head_split` places them: for each cut of the head axes into a prefix (K) and the
    rest (G), round each up to its devices; keep the fewest query + K/V heads (weights and cache
    grow with them), ties to the cut that shards K further (smaller caches under attn=heads)."""
    wide, sizes = layout.wide(), layout.sizes
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for i in range(len(wide) + 1):
        nk, ng = math.prod(sizes[a] for a in wide[:i]), math.prod(sizes[a] for a in wide[i:])
        k, g = -(-kv_heads // nk) * nk, -(-groups // ng) * ng
        key = (k * g + k, -i)
        if best is None or key < best[0]:
            best = (key, (k, g))
    assert best is not None
    return best[1]


def weight_axes(layout: Layout, name: str, t: TensorType, heads: HeadSplit,
                kind: str = "") -> dict[str, tuple[str, ...]]:
    """Sharding of one weight (dims without the stacked N; ``kind`` as ir/module.py KINDS)."""
    names = t.names.lstrip("N")
    wide, narrow = layout.wide(), layout.narrow()
    if "X" in names:
        return expert_weight_axes(layout, name, t)
    if names == "VE":  # embedding table / output head: vocab-parallel
        return {"V": layout.all_axes} if _fits(t.size("V"), layout.all_axes, layout.sizes) else {}
    if len(names) == 1 or kind in ("bias", "norm"):
        return {}  # norm scales and biases: replicated, sliced where used (no communication)
    out: dict[str, tuple[str, ...]] = {}
    if "E" in names:
        out["E"] = narrow
    if "F" in names:
        out["F"] = wide
    if "H" in names:
        out["H"] = wide
    if "K" in names:  # grouped queries: K x G jointly over the head axes
        out["K"] = heads.k
    if "G" in names:
        out["G"] = heads.g
    return out


def expert_slice_axes(layout: Layout) -> tuple[str, ...]:
    """The axes that slice each expert's F: every mesh axis the experts are not sharded over."""
    return tuple(a for a in layout.all_axes if a not in layout.experts)


def expert_weight_axes(layout: Layout, name: str, t: TensorType) -> dict[str, tuple[str, ...]]:
    """Sharding of a mixture-of-experts weight: routed experts [X, E, F] / [X, F, E] with X over
    the expert axes and F over the rest (the longest prefix F divides); the router [E, X] and its
    bias are replicated (a few KiB, and every token needs every expert's logit)."""
    names = t.names.lstrip("N")
    if "F" not in names:
        return {}
    if not _fits(t.size("X"), layout.experts, layout.sizes):
        n = math.prod(layout.sizes[a] for a in layout.experts)
        raise LayoutError(f"weight %{name}: {t.size('X')} experts do not divide over "
                          f"{{{','.join(layout.experts)}}} ({n} devices)",
                          hint="choose expert axes whose device count divides the experts (serve.expert_axes)")
    return {"X": layout.experts, "F": dividing_prefix(t.size("F"), expert_slice_axes(layout), layout.sizes)}


def default_expert_axes(experts: int, mesh: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """Expert parallelism first (DeepSpeed-MoE): the longest prefix of the mesh axes whose devices
    divide the experts; the remaining axes slice each expert."""
    return dividing_prefix(experts, tuple(a for a, _ in mesh), dict(mesh))


def dividing_prefix(size: int, axes: tuple[str, ...], sizes: dict[str, int]) -> tuple[str, ...]:
    """The longest prefix of ``axes`` over which ``size`` divides."""
    keep = axes
    while keep and not _fits(size, keep, sizes):
        keep = keep[:-1]
    return keep


def cache_axes(layout: Layout, t: TensorType, heads: HeadSplit) -> dict[str, tuple[str, ...]]:
    names = t.names.lstrip("N")
    if layout.attn == "batch":
        # WS: the axis order the query heads end up in, so the reshard is one all-to-all;
        # WG: an extension of the activations' batch sharding, so the reshard is a local slice.
        # A batch that does not divide over every axis is sharded over the longest prefix it
        # divides (the paper: at least one full axis), the cache replicated over the rest; with
        # none, the first axis is asked for and refused.
        order = layout.prefer()["B"]
        return {"B": dividing_prefix(t.size("B"), order, layout.sizes) or order[:1]}
    if "H" in names:
        return {"H": layout.wide()}
    if "K" in names:
        return {"K": heads.k}  # replicated over G's axes: each device's query groups need it
    return {}
