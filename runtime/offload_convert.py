"""The one-time conversion of a checkpoint into the offload store, tensor by tensor and layer by
layer, so that writing the store needs about the memory budget that reading it does.

Loading the checkpoint whole and running the module's ``@prepare`` over it (the resident path)
peaks at the checkpoint plus the prepared weights: 3x the budget for SmolLM2 in f32. Here the
weights are read lazily (runtime/sliced_weights.py: ``w[i]`` reads one layer) and ``@prepare`` is
cut into its independent groups (one output's ops and the params they read: a quantized
projection, a packed qkv, a weight passed through). A group over per-layer weights runs once per
layer on the prepare of a one-layer module (the same ops at N = 1); a group over global weights
runs once. Each result is written to its place in the store at once (runtime/offload_store.py
StoreWriter), so the process holds one group's inputs and outputs at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ir.module import Function, Module
from runtime.kernels import Interpreter
from runtime.lower_jax import JNP_DTYPES, JaxBackend, layer_split
from runtime.offload_store import StoreLayout, StoreWriter, plan_store
from runtime.projections import out_in_layouts, transpose_host
from runtime.weights import fit_to_params


class MixedPrepareGroup(ValueError):
    """A @prepare group reads both per-layer and global weights, so it cannot run layer by layer
    (the caller converts the whole model at once instead)."""


def _np_name(dtype: str) -> str:
    return np.dtype(JNP_DTYPES[dtype]).name


def store_plan(module: Module, key: str) -> StoreLayout:
    """The store layout of ``module``'s decode entry: its served weight dtypes, projection
    weights held [out, in] as the resident runner holds them (runtime/projections.py), so the
    streamed layers compute exactly what the resident ones do (and int8 converts inside the dot)."""
    fn = module.function("decode")
    ws = fn.params_with_role("weight")
    perms = out_in_layouts(module, "decode", split_layers=True)

    def shape(p: Any) -> tuple[int, ...]:
        s = p.type.shape[1:] if layer_split(p.type) else p.type.shape
        perm = perms.get(p.name)
        return tuple(s) if perm is None else tuple(s[i] for i in perm)

    glob = {p.name: (_np_name(p.type.dtype), shape(p)) for p in ws if not layer_split(p.type)}
    layered = {p.name: (_np_name(p.type.dtype), shape(p)) for p in ws if layer_split(p.type)}
    n = {p.type.shape[0] for p in ws if layer_split(p.type)}
    return plan_store(key, n.pop() if n else 0, glob, layered, perms)


@dataclass(frozen=True)
class Group:
    """Entry weights computed together from some raw weights: ``fn`` (a cut of @prepare, None
    when the outputs are the inputs themselves) maps ``inputs`` to the entry weights ``outputs``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: Function | None
    layered: bool


def prepare_groups(module: Module) -> list[Group]:
    """``module``'s @prepare cut into independent groups (connected by the ops between raw
    weights and entry weights); without @prepare each weight is its own group."""
    entry = [p.name for p in module.entries[0].params_with_role("weight")]
    prep = module.prepare
    if prep is None:
        ps = {p.name: p for p in module.entries[0].params_with_role("weight")}
        return [Group((n,), (n,), None, layer_split(ps[n].type)) for n in entry]
    params = {p.name: p for p in prep.params}
    # union-find over values: an op joins its operands and results
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for op in prep.ops:
        vals = list(op.operands) + list(op.results)
        for v in vals[1:]:
            parent[find(v)] = find(vals[0])
    comps: dict[str, list[int]] = {}
    for j, r in enumerate(prep.returns):
        comps.setdefault(find(r), []).append(j)
    groups = []
    for root, idx in comps.items():
        ins = tuple(n for n in params if find(n) == root)
        outs = tuple(prep.returns[j] for j in idx)
        layered = {layer_split(params[n].type) for n in ins}
        if len(layered) != 1:
            raise MixedPrepareGroup("a @prepare group mixes per-layer and global weights")
        ops = tuple(op for op in prep.ops if any(find(v) == root for v in (*op.operands, *op.results)))
        types = prep.value_types
        fn = replace(prep, params=tuple(params[n] for n in ins), ops=ops, returns=outs,
                     result_types=tuple(types[r] for r in outs))
        groups.append(Group(ins, tuple(entry[j] for j in idx), fn, layered.pop()))
    return groups


def _run(interp: Interpreter, g: Group, raw: Mapping[str, np.ndarray]) -> list[Any]:
    if g.fn is None:
        return [raw[n] for n in g.inputs]
    types = {p.name: p.type for p in g.fn.params}
    args = tuple(jnp.asarray(raw[n], JNP_DTYPES[types[n].dtype]) for n in g.inputs)
    return list(interp.call(g.fn, args))


def convert_to_store(one_layer: Module, layout: StoreLayout, weights: Mapping[str, Any],
                     directory: str | Path) -> StoreLayout:
    """Writes the store of ``layout`` from raw checkpoint ``weights`` (lazy or in memory), one
    group at a time and, for per-layer groups, one layer at a time through ``one_layer`` (the
    same model built with one layer: its @prepare is the per-layer one). MixedPrepareGroup (before
    anything is written) when @prepare cannot be cut so."""
    groups = prepare_groups(one_layer)
    raw_params = one_layer.raw_weight_params()
    served = {p.name: JNP_DTYPES[p.type.dtype] for p in one_layer.entries[0].params_with_role("weight")}
    interp = Interpreter(one_layer, JaxBackend())
    w = StoreWriter(directory, layout)
    try:
        for g in groups:
            for i in (range(layout.layers) if g.layered else (None,)):
                raw = {n: np.asarray(weights[n]) if i is None else np.asarray(weights[n][i])[None] for n in g.inputs}
                raw = fit_to_params(raw, raw_params)
                for name, out in zip(g.outputs, _run(interp, g, raw)):
                    a = np.asarray(jnp.asarray(out, dtype=served[name]))  # the served dtype, as resident
                    if i is None:
                        w.put_global(name, transpose_host(a, layout.perm(name)))
                    else:
                        w.put_layer(i, name, transpose_host(a[0], layout.perm(name)))
                del raw
        return w.finish()
    except BaseException:
        w.abort()
        raise


def write_prepared(module: Module, prepared: Mapping[str, Any], directory: str | Path, key: str) -> StoreLayout:
    """Writes a store from the whole model's prepared weights (stacked [N, ...] per-layer ones),
    laid out as :func:`store_plan` says: the path for a @prepare that cannot be cut."""
    layout = store_plan(module, key)
    served = {p.name: JNP_DTYPES[p.type.dtype] for p in module.function("decode").params_with_role("weight")}
    w = StoreWriter(directory, layout)
    try:
        for s in layout.globals_:
            w.put_global(s.name, transpose_host(np.asarray(jnp.asarray(prepared[s.name], served[s.name])),
                                                layout.perm(s.name)))
        for s in layout.layer:
            a = np.asarray(jnp.asarray(prepared[s.name], served[s.name]))
            for i in range(layout.layers):
                w.put_layer(i, s.name, transpose_host(a[i], layout.perm(s.name)))
        return w.finish()
    except BaseException:
        w.abort()
        raise
