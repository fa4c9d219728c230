"""networkx views of a function's dataflow: liveness, topological order, reachability."""

from __future__ import annotations

import networkx as nx

from ir.module import Function
from ir.ops import Op

RETURN = "<return>"


def dataflow(fn: Function) -> nx.DiGraph:
    """Nodes are op indices, ``param:NAME`` for params and ``<return>``; edges run def -> use."""
    g = nx.DiGraph()
    src: dict[str, object] = {}
    for p in fn.params:
        node = f"param:{p.name}"
        g.add_node(node, kind="param")
        src[p.name] = node
    for i, op in enumerate(fn.ops):
        g.add_node(i, kind=op.kind)
        for o in op.operands:
            if o in src:
                g.add_edge(src[o], i, value=o)
        for r in op.results:
            src[r] = i
    g.add_node(RETURN, kind="return")
    for r in fn.returns:
        if r in src:
            g.add_edge(src[r], RETURN, value=r)
    return g


def live_ops(fn: Function) -> set[int]:
    """Indices of the ops the returned values depend on."""
    g = dataflow(fn)
    return {n for n in nx.ancestors(g, RETURN) if isinstance(n, int)}


def users(fn: Function) -> dict[str, list[int]]:
    """Value name -> indices of the ops that read it."""
    out: dict[str, list[int]] = {}
    for i, op in enumerate(fn.ops):
        for o in op.operands:
            out.setdefault(o, []).append(i)
    return out


def readers(fn: Function) -> dict[str, list[Op]]:
    """Value name -> the ops that read it."""
    return {v: [fn.ops[i] for i in idx] for v, idx in users(fn).items()}
