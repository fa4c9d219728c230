"""The collective-algebra rules of ``cleanup`` do not change what a module computes.

Two checks, both in the numpy SPMD simulator (one array per device, real collectives) in
float64 on small integer-valued data, so equal programs give equal results to rounding
(asserted within 1e-12):

* every case of tests/golden/cleanup.ir: its input module and the module ``cleanup`` makes of
  it compute the same results (reshards are expanded by ``insert-collectives`` first, since the
  simulator runs collectives, not reshards; partial results are all-reduced so they can be
  compared);
* per rule, hypothesis draws meshes, axes (order included) and shardings, builds the pattern
  the rule matches (and near misses it must leave alone), and checks both that the rule fires
  exactly when it should and that the results agree. Partial sums come from an einsum over a
  sharded dim, so each device holds a different addend.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import test_golden as golden
from compiler.driver import compile_module
from ir.collectives import AllReduce
from ir.errors import EinshardError
from ir.module import Module
from ir.parser import parse_module
from ir.printer import print_module
from ir.types import TensorType
from runtime.spmd import run_spmd

ATOL = 1e-12

#: Meshes of up to 8 devices (one, two and three axes, one uneven).
MESHES = (
    (("x", 2),),
    (("x", 2), ("y", 2)),
    (("x", 4), ("y", 2)),
    (("x", 2), ("y", 2), ("z", 2)),
)


# ---- running and comparing -------------------------------------------------------------------


def _reduce_partial_results(m: Module) -> Module:
    """Entries whose results are partial sums get an all-reduce before returning them."""
    fns = []
    for fn in m.functions:
        if not fn.entry or not any(t.partial for t in fn.result_types):
            fns.append(fn)
            continue
        ops, rets, types = list(fn.ops), [], []
        for i, (r, t) in enumerate(zip(fn.returns, fn.result_types)):
            if t.partial:
                full = TensorType(t.dtype, t.dims, frozenset())
                name = f"__reduced{i}"
                ops.append(AllReduce(results=(name,), operands=(r,), types=(full,),
                                     axes=tuple(a for a, _ in m.mesh if a in t.partial), reason="test"))
                r, t = name, full
            rets.append(r)
            types.append(t)
        fns.append(replace(fn, ops=tuple(ops), returns=tuple(rets), result_types=tuple(types)))
    return m.with_functions(fns)


def _executable(m: Module) -> Module:
    if any(op.kind == "reshard" for f in m.functions for op in f.ops):
        m = compile_module(m, "insert-collectives").module
    return _reduce_partial_results(m)


def _random_args(m: Module, entry: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {p.name: rng.integers(-3, 4, size=p.type.shape).astype(np.float64)
            for p in m.function(entry).params}


def assert_same_results(before: Module, after: Module, seed: int = 0) -> None:
    """Every entry of ``after`` computes what the same entry of ``before`` does."""
    a, b = _executable(before), _executable(after)
    rng = np.random.default_rng(seed)
    for fn in b.entries:
        args = _random_args(a, fn.name, rng)
        want = run_spmd(a, fn.name, args)
        got = run_spmd(b, fn.name, args)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)


def _cleanup(m: Module) -> tuple[Module, dict[str, int]]:
    res = compile_module(m, "cleanup")
    return res.module, res.run.records[0].stats


# ---- every golden case ---------------------------------------------------------------------

CASES = [c for c in golden.CASES if c.file.name == "cleanup.ir" and c.directive("CHECK")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_case_computes_the_same(case: golden.Case) -> None:
    case = golden.split_cases(case.file)[case.index]
    before = parse_module(case.text, case.file.name)
    after = parse_module("\n".join(case.directive("CHECK")) + "\n")
    assert print_module(compile_module(before, case.directive("RUN")[0]).module) == print_module(after)
    assert_same_results(before, after)


# ---- hypothesis: the patterns each rule matches, and near misses ----------------------------


def _ty(dims: list[tuple[str, int, tuple[str, ...]]], partial: tuple[str, ...] = ()) -> str:
    body = ", ".join(f"{n}={s}" + ("{" + ",".join(ax) + "}" if ax else "") for n, s, ax in dims)
    return f"f32[{body}]" + (" partial{" + ",".join(sorted(partial)) + "}" if partial else "")


def _module(mesh, params: list[tuple[str, str]], body: list[str], rets: list[tuple[str, str]]) -> Module:
    m = ", ".join(f"{a}={s}" for a, s in mesh)
    text = "\n".join([
        f"module @m mesh<{m}> {{",
        "  entry func @f(",
        ",\n".join(f"      %{n}: {t}" for n, t in params),
        "  ) -> (" + ", ".join(t for _, t in rets) + ") {",
        *[f"    {line}" for line in body],
        "    return " + ", ".join(f"%{n}" for n, _ in rets),
        "  }",
        "}",
    ])
    return parse_module(text + "\n")


@st.composite
def axes_split(draw, parts: int):
    """A mesh and its axes dealt, in a random order, into ``parts`` disjoint tuples (the first
    nonempty)."""
    mesh = draw(st.sampled_from(MESHES))
    names = draw(st.permutations([a for a, _ in mesh]))
    cuts = sorted(draw(st.lists(st.integers(0, len(names)), min_size=parts, max_size=parts)))
    cuts[0] = max(cuts[0], 1)
    cuts = [min(max(c, cuts[0]), len(names)) for c in cuts]
    bounds = [0] + cuts
    out = [tuple(names[bounds[i]:bounds[i + 1]]) for i in range(parts)]
    return mesh, out


def _q(axes: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{a}"' for a in axes) + "]"


@given(split=axes_split(3), second_use=st.booleans(), seed=st.integers(0, 2**16))
def test_rs_ag_to_ar(split, second_use: bool, seed: int) -> None:
    """RS{A} then AG{A} on F, F already sharded over C: an all-reduce (unless the scattered
    value has another reader)."""
    mesh, (a, c, b) = split
    rs = [("B", 4, b), ("F", 16, c + a)]
    body = [
        f'%h = einsum(%x, %w) {{spec = "BE,EF->BF"}} : {_ty([("B", 4, b), ("F", 16, c)], a)}',
        f'%s = reduce_scatter(%h) {{axes = {_q(a)}, dim = "F", reason = "r1"}} : {_ty(rs)}',
        f'%g = all_gather(%s) {{axes = {_q(a)}, dim = "F", reason = "r2"}} : {_ty([("B", 4, b), ("F", 16, c)])}',
    ]
    rets = [("g", _ty([("B", 4, b), ("F", 16, c)]))]
    if second_use:
        body.append(f'%t = unary(%s) {{fn = "tanh"}} : {_ty(rs)}')
        rets.append(("t", _ty(rs)))
    before = _module(mesh, [("x", _ty([("B", 4, b), ("E", 8, a)])), ("w", _ty([("E", 8, a), ("F", 16, c)]))],
                     body, rets)
    after, stats = _cleanup(before)
    assert stats["rs-ag-to-ar matches"] == (0 if second_use else 1)
    kinds = [op.kind for op in after.function("f").ops]
    assert ("all_reduce" in kinds) != second_use
    assert_same_results(before, after, seed)


@given(split=axes_split(3), drop=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_rs_ag_axes_differ(split, drop: int, seed: int) -> None:
    """RS{A} then AG over a proper suffix of A: a reduce-scatter remains, nothing fires."""
    mesh, (a, c, _) = split
    drop = min(drop, len(a) - 1)
    if drop == 0:
        return  # A has one axis: no proper nonempty suffix
    g = a[drop:]
    body = [
        f'%s = reduce_scatter(%h) {{axes = {_q(a)}, dim = "F", reason = "r"}} : {_ty([("F", 16, c + a)])}',
        f'%g = all_gather(%s) {{axes = {_q(g)}, dim = "F", reason = "r"}} : {_ty([("F", 16, c + a[:drop])])}',
    ]
    before = _module(mesh, [("h", _ty([("F", 16, c)], a))], body, [("g", _ty([("F", 16, c + a[:drop])]))])
    after, stats = _cleanup(before)
    assert stats["rs-ag-to-ar matches"] == 0
    assert after == before
    assert_same_results(before, after, seed)


@given(split=axes_split(3), other_use=st.booleans(), seed=st.integers(0, 2**16))
def test_ag_of_slice(split, other_use: bool, seed: int) -> None:
    """AG{A}(LS{A}(x)) on E is x; the slice stays only for another reader."""
    mesh, (a, c, b) = split
    sl = [("B", 4, b), ("E", 16, c + a)]
    xt = _ty([("B", 4, b), ("E", 16, c)])
    body = [
        f'%s = local_slice(%x) {{axes = {_q(a)}, dim = "E", reason = "r"}} : {_ty(sl)}',
        f'%g = all_gather(%s) {{axes = {_q(a)}, dim = "E", reason = "r"}} : {xt}',
        f'%y = unary(%g) {{fn = "tanh"}} : {xt}',
    ]
    rets = [("y", xt)]
    if other_use:
        body.append(f'%t = unary(%s) {{fn = "neg"}} : {_ty(sl)}')
        rets.append(("t", _ty(sl)))
    before = _module(mesh, [("x", xt)], body, rets)
    after, stats = _cleanup(before)
    assert stats["ag-of-slice matches"] == 1
    kinds = [op.kind for op in after.function("f").ops]
    assert "all_gather" not in kinds and ("local_slice" in kinds) == other_use
    assert_same_results(before, after, seed)


@given(split=axes_split(3), same_dim=st.booleans(), seed=st.integers(0, 2**16))
def test_slice_of_ag(split, same_dim: bool, seed: int) -> None:
    """LS{A}(AG{A}(x)) on E is x; sliced on another dim (B) it is a different layout."""
    mesh, (a, c, b) = split
    xt = _ty([("B", 16, b), ("E", 16, c + a)])
    gt = _ty([("B", 16, b), ("E", 16, c)])
    st_ = xt if same_dim else _ty([("B", 16, b + a), ("E", 16, c)])
    dim = "E" if same_dim else "B"
    body = [
        f'%g = all_gather(%x) {{axes = {_q(a)}, dim = "E", reason = "r"}} : {gt}',
        f'%s = local_slice(%g) {{axes = {_q(a)}, dim = "{dim}", reason = "r"}} : {st_}',
    ]
    before = _module(mesh, [("x", xt)], body, [("s", st_)])
    after, stats = _cleanup(before)
    assert stats["slice-of-ag matches"] == int(same_dim)
    assert (after.function("f").ops == ()) == same_dim
    assert_same_results(before, after, seed)


@given(split=axes_split(3), third=st.booleans(), seed=st.integers(0, 2**16))
def test_a2a_pair(split, third: bool, seed: int) -> None:
    """An all-to-all H->B and its inverse B->H cancel; B->D instead is a different layout."""
    mesh, (a, ch, cb) = split
    xt = _ty([("B", 16, cb), ("H", 16, ch + a), ("D", 8, ())])
    mid = _ty([("B", 16, cb + a), ("H", 16, ch), ("D", 8, ())])
    back = "D" if third else "H"
    out = _ty([("B", 16, cb), ("H", 16, ch), ("D", 8, a)]) if third else xt
    body = [
        f'%a = all_to_all(%x) {{axes = {_q(a)}, split_dim = "B", concat_dim = "H", reason = "r"}} : {mid}',
        f'%b = all_to_all(%a) {{axes = {_q(a)}, split_dim = "{back}", concat_dim = "B", reason = "r"}} : {out}',
    ]
    before = _module(mesh, [("x", xt)], body, [("b", out)])
    after, stats = _cleanup(before)
    assert stats["a2a-pair matches"] == int(not third)
    assert_same_results(before, after, seed)


@st.composite
def layout(draw, mesh, dims: tuple[str, ...], partial_from: tuple[str, ...] = ()):
    """Each mesh axis goes to one dim (in a random order), to the partial set (only axes of
    ``partial_from``), or nowhere."""
    names = draw(st.permutations([a for a, _ in mesh]))
    where = {a: draw(st.sampled_from(dims + ("-",) + (("partial",) if a in partial_from else ())))
             for a in names}
    axes = {d: tuple(a for a in names if where[a] == d) for d in dims}
    return axes, tuple(a for a in names if where[a] == "partial")


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_reshard_chain_and_noop(data, seed: int) -> None:
    """Random layouts t0 -> t1 -> t2 of one tensor (partial sums only shrinking): the chain is
    one reshard (and none when t2 is t0), and after insert-collectives it computes the same."""
    mesh = data.draw(st.sampled_from(MESHES))
    sizes = {"B": 16, "E": 16}
    (x0, p0) = data.draw(layout(mesh, ("B", "E"), tuple(a for a, _ in mesh)))
    same = data.draw(st.booleans())
    x1, p1 = (x0, p0) if same else data.draw(layout(mesh, ("B", "E"), p0))
    same = (x1, p1) == (x0, p0)
    x2, _ = data.draw(layout(mesh, ("B", "E")))

    def ty(ax, p=()):
        return _ty([(d, sizes[d], ax[d]) for d in ("B", "E")], p)

    k = tuple(a for a in p0)
    body = [
        f'%h = einsum(%x, %w) {{spec = "BK,KE->BE"}} : {ty(x0, p0)}',
        f'%a = reshard(%h) {{reason = "r1"}} : {ty(x1, p1)}',
        f'%b = reshard(%a) {{reason = "r2"}} : {ty(x2)}',
    ]
    params = [("x", _ty([("B", 16, x0["B"]), ("K", 8, k)])), ("w", _ty([("K", 8, k), ("E", 16, x0["E"])]))]
    before = _module(mesh, params, body, [("b", ty(x2))])
    try:
        after, stats = _cleanup(before)
    except EinshardError as e:  # pragma: no cover - a rule must never produce invalid IR
        raise AssertionError(f"cleanup broke a valid module: {e}") from e
    assert stats["reshard-noop matches"] + stats["reshard-chain matches"] >= 1
    if same:
        assert stats["reshard-noop matches"] >= 1
    reshards = [op for op in after.function("f").ops if op.kind == "reshard"]
    assert len(reshards) == (0 if (x2, ()) == (x0, p0) else 1)
    assert_same_results(before, after, seed)
