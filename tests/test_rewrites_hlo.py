"""Compiled XLA programs of the rewrite passes, and what fusion does to the ledger.

* collective-einsum: for a fired site the optimized HLO has collective-permutes over the site's
  ring (the device groups of the site's mesh axes) and the site's all-gather/reduce-scatter is
  gone: the non-permute collectives per computation equal the ledger's entries *without* the
  looped ones (test_hlo.expected skips them), over the same device groups; the looped ones
  appear only as permutes. A ring of K > 2 devices runs K-1 steps as a ``while`` loop nested in
  the layer scan's body (or in the entry); XLA unrolls the one-step loop of a 2-device ring, so
  for those only the permute itself is checked.
* fuse-parallel-block: with the same layout, the fused program's ledger has fewer collectives per
  layer than the unfused one, and no more bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from conftest import EXAMPLES
from partition_helpers import MESH_8, build, shard_pass
from passes.ledger import ledger
from runtime.generate import zero_caches
from runtime.weights import random_weights
from test_hlo import _INSTR, BATCH, CACHE, MQA, PROMPT, computations, expected, mesh_groups, reachable, replica_groups

_PERMUTE = re.compile(r"collective-permute\(.*source_target_pairs=\{([\d,{} ]*)\}")


@lru_cache(maxsize=None)
def lowered_looped(ffn: str, attn: str, bidirectional: bool, phase: str = "decode"):
    from runtime.lower_jax import JaxExecutor

    loops = "collective-einsum" + ("{bidirectional=true}" if bidirectional else "")
    m = compile_module(build(MQA, BATCH, PROMPT, CACHE, MESH_8),
                       f"{shard_pass(ffn, attn)},insert-collectives,cleanup,{loops}").module
    ex = JaxExecutor(m)
    L = PROMPT if phase == "prefill" else 1
    args = {**random_weights(m.function("prefill"), 0), **zero_caches(m, phase),
            "tokens": np.zeros((BATCH, L), np.int32), "pos": np.zeros((BATCH, L), np.int32)}
    return m, ex.entries[phase].lower(ex.prepare(phase, args)).compile().as_text()


def permute_groups(line: str) -> frozenset[frozenset[int]]:
    """The connected components of a collective-permute's source -> target pairs (its rings)."""
    pairs = [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", _PERMUTE.search(line).group(1))]
    comp = {d: {d} for p in pairs for d in p}
    for a, b in pairs:
        if comp[a] is not comp[b]:
            merged = comp[a] | comp[b]
            for d in merged:
                comp[d] = merged
    return frozenset(frozenset(c) for c in comp.values())


def collectives_in(comps, names) -> Counter:
    """(opcode, device groups) of every collective but the permutes in the named computations."""
    out: Counter = Counter()
    for c in names:
        for line in comps[c]:
            m = _INSTR.search(line)
            if m and m.group(1) != "collective-permute":
                out[(m.group(1), replica_groups(m.group(2)))] += 1
    return out


def permutes_in(comps, names) -> list[tuple[str, frozenset]]:
    return [(c, permute_groups(line)) for c in names for line in comps[c] if "collective-permute(" in line]


def whiles_in(comps, names) -> list[str]:
    """Body computations of the while loops in the named computations."""
    return [re.search(r"body=%?([\w.\-]+)", line).group(1) for c in names for line in comps[c]
            if re.search(r"\swhile\(", line)]


CASES = [("2d-ws", "batch", False), ("2d-ws", "batch", True), ("1d-ws", "heads", False), ("wg-xyz", "batch", False)]


@pytest.mark.parametrize("ffn,attn,bidi", CASES, ids=[f"{f}-{a}-{'bidi' if b else 'oneway'}" for f, a, b in CASES])
def test_looped_sites_are_permute_rings_in_hlo(ffn, attn, bidi):
    m, hlo = lowered_looped(ffn, attn, bidi)
    comps = computations(hlo)
    # the layer scan: of the entry's while loops, the one whose body reaches the most collectives
    bodies = whiles_in(comps, ["ENTRY"])
    body = max(bodies, key=lambda b: sum(collectives_in(comps, reachable(comps, b)).values()))
    in_body = reachable(comps, body)
    in_entry = reachable(comps, "ENTRY") - in_body
    looped = [e for e in ledger(m) if e.looped]
    assert looped, "no collective-einsum site fired"
    if bidi:  # an odd chunk falls back to a one-way ring (the notes say so)
        assert any(e.looped == "bidirectional" for e in looped)
    else:
        assert all(e.looped == "one-way" for e in looped)
    for region, fn, names in (("layer body", "decode_layer", in_body), ("entry", "decode", in_entry)):
        got = collectives_in(comps, names)
        want = expected(m, fn)  # the ledger without its looped entries
        assert got == want, f"{region}: HLO {sorted(got.items())} vs ledger (un-looped) {sorted(want.items())}"
        perms = permutes_in(comps, names)
        inner = set()
        for b in whiles_in(comps, names):
            if b != body:
                inner |= reachable(comps, b)
        for e in (e for e in looped if e.function == fn):
            ring = mesh_groups(e.axes)
            hits = [c for c, g in perms if g == ring]
            assert hits, f"{region}: no collective-permute over the ring of %{e.value} {e.kind} {e.axes}"
            k = len(next(iter(ring)))
            if not bidi and k > 2:
                assert any(c in inner for c in hits), \
                    f"{region}: the ring of %{e.value} over {e.axes} ({k} devices) is not inside a while loop"
    # nothing else moves data around a ring
    assert not any(g not in {mesh_groups(e.axes) for e in looped} for _, g in permutes_in(comps, comps.keys()))


# ---- fusion saves collectives -----------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_fusion_fewer_collectives_per_layer(phase):
    spec = apply_overrides(load_spec(EXAMPLES / "tiny-mqa.model"), ffn="2d-ws", phase=phase)
    assert spec.model.block == "parallel" and spec.mesh.n_devices == 8
    module = build_for(spec, compile_config(spec))
    plain, fused = default_pipeline(spec, rewrites=False), default_pipeline(spec)
    assert "fuse-parallel-block" in fused and "fuse-parallel-block" not in plain
    per_layer = {}
    for name, pipe in (("plain", plain), ("fused", fused)):
        entries = [e for e in ledger(compile_module(module, pipe).module) if e.function == f"{phase}_layer"]
        per_layer[name] = (len(entries), sum(e.bytes_per_device for e in entries))
    assert per_layer["fused"][0] < per_layer["plain"][0], per_layer
    assert per_layer["fused"][1] <= per_layer["plain"][1], per_layer
