"""The compiled XLA programs contain the collectives the ledger promises, and hold the bytes the
types promise.

For each FFN x attention layout on the 8-device mesh (x=2, y=2, z=2), the JAX entries
(runtime.lower_jax.lower_entry, shard_map inside jit) are lowered and compiled for the simulated
CPU devices, and the optimized HLO is read:

* collectives are counted by opcode (``all-gather(``, ``reduce-scatter(``, ``all-reduce(``,
  ``all-to-all(``, ``collective-permute(``), separately for the layer body and the entry. The
  layer body is a ``lax.scan``: it appears once in the HLO, as the body computation of one
  ``while`` loop, so it is compared with the ledger's per-function counts (not times layers).
* each collective's device groups (``replica_groups``) must be the groups of the mesh axes the
  ledger names: a collective over the wrong axes would show up here even with the right count.
* ``compiled.memory_analysis()``: the argument bytes per device are exactly the local bytes of the
  params' types (weights + caches + tokens/positions), e.g. a batch-sharded multiquery KV cache is
  1/8 of its total; the donated caches alias the outputs.

The one legitimate difference between ledger and HLO on this XLA (jax 0.10 CPU): a norm over a
sharded E is *one* ledger entry ("norm over sharded E: statistics", priced for all its
statistics), but its kernel (runtime/kernels.py ``_norm``) psums each statistic separately, and the
variance needs the mean first, so XLA cannot combine them: a layernorm is 2 ``all-reduce``s in HLO
(mean, then mean of squares of the centred values), an rmsnorm 1. Reduce-scatters stay
``reduce-scatter`` and all-to-alls stay ``all-to-all`` on this backend (no all-reduce +
dynamic-slice rewrite), and there are no ``collective-permute``s (no overlap pass yet). Local
slices are ``dynamic-slice``s and not collectives.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from compiler.spec import ModelSpec
from partition_helpers import ATTN_LAYOUTS, FFN_LAYOUTS, MESH_8, compile_layout
from passes.ledger import ledger
from runtime.generate import zero_caches
from runtime.weights import random_weights

OPCODES = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "all_reduce": "all-reduce",
           "all_to_all": "all-to-all", "collective_permute": "collective-permute"}
_INSTR = re.compile(r"=\s*\S.*?\s(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)\((.*)$")

MQA = ModelSpec("h-mqa", layers=2, d_model=32, heads=8, kv_heads=1, d_head=8, d_ff=64, vocab=64,
                block="parallel", mlp="swiglu", norm="layernorm", tie_embeddings=True)
MHA_RMS = ModelSpec("h-mha", layers=3, d_model=32, heads=8, kv_heads=8, d_head=4, d_ff=32, vocab=40,
                    block="serial", mlp="gelu", norm="rmsnorm", bias="all")
BATCH, PROMPT, CACHE = 8, 4, 8


# ---- HLO reading ------------------------------------------------------------------------------


def computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (ENTRY under its own name and under 'ENTRY')."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                comps["ENTRY"] = comps[cur]
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    return comps


def called(line: str) -> list[str]:
    out = []
    for key in ("calls", "to_apply", "body", "condition", "branch_computations"):
        for m in re.finditer(rf"{key}=\{{?([^,}}]*(?:,\s*%[\w.\-]+)*)\}}?", line):
            out += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
    return out


def reachable(comps: dict[str, list[str]], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            todo += called(line)
    return seen


def replica_groups(rest: str) -> frozenset[frozenset[int]]:
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", rest)
    if m:
        return frozenset(frozenset(int(x) for x in g.split(",") if x.strip())
                         for g in re.findall(r"\{([\d, ]*)\}", m.group(1)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    assert m, f"no replica_groups in: {rest[:200]}"
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(4):
        ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return frozenset(frozenset(int(v) for v in row) for row in ids.reshape(g, s))


def collectives_in(comps, names) -> Counter:
    """(opcode, device groups) of every collective instruction in the named computations."""
    out: Counter = Counter()
    for c in names:
        for line in comps[c]:
            m = _INSTR.search(line)
            if m:
                out[(m.group(1), replica_groups(m.group(2)))] += 1
    return out


def mesh_groups(axes: tuple[str, ...], mesh=MESH_8) -> frozenset[frozenset[int]]:
    """Device ids (row-major over the mesh, as jax.sharding.Mesh over jax.devices()) that differ
    only along ``axes``."""
    names = [a for a, _ in mesh]
    shape = [s for _, s in mesh]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    keep = [i for i, a in enumerate(names) if a not in axes]
    moved = np.moveaxis(ids, keep, list(range(len(keep))))
    return frozenset(frozenset(int(v) for v in row.ravel())
                     for row in moved.reshape(int(np.prod([shape[i] for i in keep])), -1))


# ---- ledger side --------------------------------------------------------------------------------


def expected(module, fn_name: str) -> Counter:
    """What the ledger promises for one function, as (opcode, device groups) counts."""
    fn = module.function(fn_name)
    ops = {r: op for op in fn.ops for r in op.results}
    out: Counter = Counter()
    for e in ledger(module):
        if e.function != fn_name or e.looped:
            continue  # a looped entry (collective-einsum) is a ring of collective-permutes instead
        n = 1
        if e.reason.startswith("norm over sharded"):
            # one ledger entry per norm; the kernel psums each statistic: layernorm 2, rmsnorm 1
            n = 2 if ops[e.value].norm == "layernorm" else 1
        # a chain of gathers is one priced entry but one HLO collective per part
        for axes in e.parts or (e.axes,):
            out[(OPCODES[e.kind], mesh_groups(axes))] += n
    return out


def summary(c: Counter) -> dict[str, int]:
    s: Counter = Counter()
    for (op, _), k in c.items():
        s[op] += k
    return dict(sorted(s.items()))


# ---- compile once per layout ------------------------------------------------------------------------


@lru_cache(maxsize=None)
def lowered(model: ModelSpec, ffn: str, attn: str, phase: str):
    from runtime.lower_jax import JaxExecutor

    m = compile_layout(model, BATCH, PROMPT, CACHE, MESH_8, ffn, attn, entries=("prefill", "decode"))
    ex = JaxExecutor(m)
    fn = m.function(phase)
    L = PROMPT if phase == "prefill" else 1
    args = {**random_weights(m.function("prefill"), 0), **zero_caches(m, phase),
            "tokens": np.zeros((BATCH, L), np.int32), "pos": np.zeros((BATCH, L), np.int32)}
    compiled = ex.entries[phase].lower(ex.prepare(phase, args)).compile()
    return m, fn, compiled, compiled.as_text()


def check_collectives(model, ffn, attn, phase):
    m, fn, compiled, hlo = lowered(model, ffn, attn, phase)
    comps = computations(hlo)
    whiles = [line for line in comps["ENTRY"] if re.search(r"\swhile\(", line)]
    assert len(whiles) == 1, "one scan over the layers = one while loop in the entry"
    body = re.search(r"body=%?([\w.\-]+)", whiles[0]).group(1)
    in_body = reachable(comps, body)
    in_entry = reachable(comps, "ENTRY") - in_body
    got_body, got_entry = collectives_in(comps, in_body), collectives_in(comps, in_entry)
    want_body, want_entry = expected(m, f"{phase}_layer"), expected(m, phase)
    assert summary(got_body) == summary(want_body), f"layer body: HLO {summary(got_body)} vs ledger {summary(want_body)}"
    assert summary(got_entry) == summary(want_entry), f"entry: HLO {summary(got_entry)} vs ledger {summary(want_entry)}"
    # and each over the right devices
    assert got_body == want_body
    assert got_entry == want_entry
    assert "collective-permute(" not in hlo


LAYOUTS = [(f, a) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS]


@pytest.mark.parametrize("phase", ["decode"])
@pytest.mark.parametrize("ffn,attn", [("2d-ws", "batch")])
def test_hlo_collectives_match_ledger_quick(ffn, attn, phase):
    check_collectives(MQA, ffn, attn, phase)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("ffn,attn", LAYOUTS, ids=[f"{f}-{a}" for f, a in LAYOUTS])
def test_hlo_collectives_match_ledger(ffn, attn, phase):
    check_collectives(MQA, ffn, attn, phase)


@pytest.mark.slow
@pytest.mark.parametrize("ffn,attn", [("1d-ws", "heads"), ("2d-ws", "heads"), ("wg-xy", "batch")])
def test_hlo_rmsnorm_statistics_are_one_all_reduce(ffn, attn):
    """Serial MHA block with rmsnorm and biases: one psum per norm over a sharded E."""
    check_collectives(MHA_RMS, ffn, attn, "decode")


# ---- memory --------------------------------------------------------------------------------------------


def check_memory(model, ffn, attn, phase):
    m, fn, compiled, _ = lowered(model, ffn, attn, phase)
    mesh = m.mesh_sizes
    ma = compiled.memory_analysis()
    local = {p.name: p.type.local_nbytes(mesh) for p in fn.params}
    assert ma.argument_size_in_bytes == sum(local.values())
    caches = sum(local[p.name] for p in fn.params_with_role("cache"))
    assert ma.alias_size_in_bytes == caches, "the caches are donated and updated in place"
    return m, fn, local


@pytest.mark.parametrize("ffn", ["2d-ws"])
def test_memory_arguments_are_the_local_blocks_quick(ffn):
    m, fn, local = check_memory(MQA, ffn, "batch", "decode")
    kc = fn.param("k_cache").type
    # batch-sharded multiquery KV cache: each device holds 1/8 of it (§6.3, §6.4)
    assert local["k_cache"] == local["v_cache"] == kc.nbytes() // 8
    # 2D-WS weights: E over x, F over (z, y): 1/8 of each matrix
    assert local["w_gate"] == fn.param("w_gate").type.nbytes() // 8


@pytest.mark.slow
@pytest.mark.parametrize("ffn,attn", LAYOUTS, ids=[f"{f}-{a}" for f, a in LAYOUTS])
def test_memory_arguments_are_the_local_blocks(ffn, attn):
    m, fn, local = check_memory(MQA, ffn, attn, "decode")
    kc = fn.param("k_cache").type
    if attn == "batch":
        assert local["k_cache"] == kc.nbytes() // 8
    else:  # multiquery sharded over heads: the single K/V head is replicated (§6.2)
        assert local["k_cache"] == kc.nbytes()
    wq = fn.param("wq").type
    assert local["wq"] == wq.nbytes() // 8  # every layout stores the weights 1/8 per device
    assert local["embed"] == fn.param("embed").type.nbytes() // 8  # vocab-parallel embedding
