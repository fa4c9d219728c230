"""Shared pieces of the rewrite-pass tests (test_rewrites_spmd.py, test_rewrites_jax.py, ...).

A rewrite case is a partitioning case of partition_helpers.cases plus a subset of the rewrite
passes in a legal order: pad-heads (when needed) < fuse-parallel-block < quantize-int8 (before
shard, or after insert-collectives) < shard < insert-collectives < cleanup < collective-einsum.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from compiler.driver import _fuse_attention, compile_module, pad_options, unsharded_pipeline
from ir.errors import LayoutError
from partition_helpers import (build, cases, check_layout_error, event, expected_layout_problems, mesh_str,
                               note, rel_err, shard_pass, spec_for)

QUANT = (None, "before", "after")
LOOPS = (None, "one-way", "bidirectional")


@st.composite
def rewrite_cases(draw, attention=("mha", "mqa", "gqa"), meshes=None):
    kw = {} if meshes is None else {"meshes": meshes}
    case = draw(cases(divisible=True, attention=attention, **kw))
    rw = (draw(st.booleans()), draw(st.sampled_from(QUANT)), draw(st.sampled_from(LOOPS)))
    return case, rw


def rewrite_pipeline(case, rw) -> str:
    model, mesh, ffn, attn, phase, batch, prompt, steps, pad, kv = case
    fuse, quant, loops = rw
    spec = spec_for(model, mesh, ffn, attn, batch, kv=kv)
    parts = []
    opts = pad_options(spec) if pad or kv == "pad" else {}  # as the default pipeline pads
    if opts:
        parts.append("pad-heads{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}")
    if fuse:
        parts.append("fuse-parallel-block" + ("" if _fuse_attention(spec) else "{attention=false}"))
    if quant == "before":
        parts.append("quantize-int8")
    parts += [shard_pass(ffn, attn, kv), "insert-collectives"]
    if quant == "after":
        parts.append("quantize-int8")
    parts.append("cleanup")
    if loops:
        parts.append("collective-einsum" + ("{bidirectional=true}" if loops == "bidirectional" else ""))
    return ",".join(parts)


def run_rewrite_case(case, rw, executor, tol: float, what: str, int8_tol: float | None = None):
    """Compiles the rewritten program; a predicted LayoutError must be the one raised, else
    ``executor(sharded)`` equals the float64 reference run on the *same* rewrites applied to the
    unsharded module (compiler.driver.unsharded_pipeline) within ``tol`` normwise, and, when
    ``int8_tol`` is given and the weights are int8, the float reference of the unrewritten model
    within ``int8_tol``. Returns the compiled result (or None after a LayoutError)."""
    from runtime.generate import ReferenceExecutor, generate
    from runtime.weights import random_tokens, random_weights

    model, mesh, ffn, attn, phase, batch, prompt, steps, pad, kv = case
    pipeline = rewrite_pipeline(case, rw)
    note(f"model={model}\nmesh={mesh_str(mesh)} batch={batch} prompt={prompt} steps={steps}\npipeline={pipeline}")
    problems = expected_layout_problems(model, batch, mesh, ffn, attn, pad=pad, kv=kv)
    cache = prompt + steps
    raw = build(model, batch, prompt, cache, mesh)
    try:
        res = compile_module(raw, pipeline)
    except LayoutError as e:
        assert problems, f"LayoutError for a layout the oracle says fits: {e}"
        check_layout_error(e, problems, mesh)
        event("LayoutError")
        return None
    assert not problems, f"compiled although {problems} do not divide"
    same = compile_module(raw, unsharded_pipeline(pipeline)).module
    seed = batch + 10 * prompt + steps
    weights = random_weights(raw.function("prefill"), seed=seed)
    tokens = random_tokens(batch, cache, model.vocab, seed=seed)
    ref = generate(ReferenceExecutor(same), weights, tokens, prompt).logits
    got = generate(executor(res.module), weights, tokens, prompt).logits
    assert got.shape == ref.shape == (batch, cache, model.vocab)
    err = rel_err(got, ref)
    note(f"normwise error vs the same program unsharded {err:.3e}")
    assert err <= tol, f"{what} logits differ from the same rewritten program unsharded: {err:.3e} > {tol:g}"
    if int8_tol is not None and rw[1]:
        flt = generate(ReferenceExecutor(raw), weights, tokens, prompt).logits
        e8 = rel_err(got, flt)
        note(f"int8 vs float reference {e8:.3e}")
        assert e8 <= int8_tol, f"{what} int8 logits too far from the float reference: {e8:.3e} > {int8_tol:g}"
    fired = [n for r in res.run.records if r.name == "collective-einsum" for n in r.notes if ": fired:" in n]
    event(f"{ffn}/{attn} fuse={rw[0]} int8={rw[1]} loops={rw[2]}" + (" (a loop fired)" if fired else ""))
    return res


def canonical(text: str) -> str:
    """A printed module with every SSA value renamed %v<i> in order of first appearance per function."""
    import re

    out, names = [], {}
    for line in text.split("\n"):
        if re.match(r"^\s*(entry\s+)?func\s+@", line):
            names = {}
        out.append(re.sub(r"%([\w.\-]+)", lambda m: "%v" + str(names.setdefault(m.group(1), len(names))), line))
    return "\n".join(out)


def logits_scale(x: np.ndarray) -> float:
    return float(np.abs(x).max())
