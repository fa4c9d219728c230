"""Regenerates docs/layouts.md and docs/rewrites.md from the compiler itself, so that the
documented dumps stay true: one PaLM 540B decode layer after every pass of the default
pipeline, without the rewrites (layouts.md, with every layout's collectives) and with them
(rewrites.md: fusion, int8, bidirectional collective einsums).

    .venv/bin/python docs/generate.py          # rewrite both
    .venv/bin/python docs/generate.py --check  # exit 1 if either is stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import Spec, apply_overrides, load_spec
from ir.module import Module
from ir.printer import print_function
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS
from passes.ledger import format_ledger, ledger
from passes.manager import Instrumentation, PassManager
from passes.pipeline import Pipeline, parse_pipeline

DOCS = ROOT / "docs"
PALM = ROOT / "examples" / "palm-540b.model"
OVERRIDES = dict(mesh="x=4,y=4,z=4", phase="decode", ffn="2d-ws", attn="batch", weights="int8",
                 overlap="bidirectional")
COMMAND = ("einshard compile examples/palm-540b.model --mesh x=4,y=4,z=4 --phase decode --ffn 2d-ws "
           "--attn batch --weights int8 --overlap bidirectional --print-ir-after-all --pass-stats")

EXPLAIN = {
    "pad-heads": "Pads the query heads with zero weights to a multiple of the devices the layout "
                 "splits them over (compiler/driver.py `head_multiple`). The layer's shapes "
                 "change; nothing else.",
    "fuse-parallel-block": "The parallel block computes attention and the MLP from the same normed "
                           "input, so their input projections become one einsum against a packed "
                           "weight (`w_in_fused`: W_q, W_gate, W_up; `w_kv_fused`: W_k, W_v) and "
                           "their output projections one einsum (`w_out_fused`: W_o, W_down) "
                           "after a `concat` of the two activations. Packing is interleaved in "
                           "groups (one group per device) so that a sharded packed dim splits "
                           "back into sharded pieces. The packing happens once, at load time, in "
                           "a new `@prepare` function; the layer takes the packed weights.",
    "quantize-int8": "Matmul weights become int8 with per-channel f32 scales (absmax over the "
                     "contracted dim; one scale per segment of a packed contracted dim). "
                     "`@prepare` quantizes; the layer `dequantize`s to bf16 next to each einsum. "
                     "Norm scales, biases and the tied embedding stay in float (the notes say why).",
    "shard": "The paper's layout (2D weight-stationary FFN, attention over batch) is applied: every "
             "param gets its sharding, every op's result type follows, and where an operand's "
             "layout differs from what the op needs a `reshard` is inserted. `@prepare` is sharded "
             "too, so packing and quantizing run on the local blocks.",
    "insert-collectives": "Every reshard becomes collectives (all-gather, reduce-scatter, "
                          "all-to-all) or free local slices, each with the reason that asked for "
                          "it. The fused projections need one collective where the unfused layer "
                          "needed one per projection; the collective ledger below prices them.",
    "cleanup": "Algebraic cleanup of collective chains, CSE and DCE, to a fixed point.",
    "collective-einsum": "Each all-gather feeding einsums, and each einsum feeding a "
                         "reduce-scatter, is a candidate site. A fired site becomes one "
                         "`collective_einsum` op: a ppermute ring that computes partial einsums "
                         "while the next block travels (bidirectional: two half rings in opposite "
                         "directions). Each site is reported fired or not, with the reason.",
}


def dump(module: Module, name: str) -> list[str]:
    if not module.has_function(name):
        return []
    return ["```", print_function(module.function(name)).rstrip(), "```", ""]


def layer_after_each_pass(spec: Spec, pipeline: str, what: str, explain: dict[str, str]) -> str:
    """The spec's @decode_layer (and @prepare where it appears or changes) after each pass of
    ``pipeline``, with the pass's statistics and notes as ``--pass-stats`` prints them, then the
    final module's collective ledger."""
    module = build_for(spec, compile_config(spec))
    lines = [f"Pipeline: `{pipeline}` ({what}).", ""]
    lines += ["### Input (the builder's unsharded layer)", ""] + dump(module, "decode_layer")
    cur = module
    prepare_text = None
    for p in parse_pipeline(pipeline).passes:
        rec = PassManager(Pipeline((p,)), Instrumentation()).run(cur)
        r = rec.records[0]
        cur = rec.module
        lines += [f"### After `{r.spelled}`", ""]
        if p.name in explain:
            lines += [explain[p.name], ""]
        if r.stats or r.notes:
            lines += ["Statistics and notes (`--pass-stats`):", "", "```"]
            lines += [f"{v:>14}  {k}" for k, v in r.stats.items()]
            lines += [f"  {n}" for n in r.notes]
            lines += ["```", ""]
        if not r.changed:
            lines += ["The module is unchanged by this pass.", ""]
            continue
        prep = print_function(cur.prepare).rstrip() if cur.prepare is not None else None
        if prep is not None and prep != prepare_text:
            lines += ["`@prepare` (load time, runs once):", ""] + dump(cur, cur.prepare.name)
            prepare_text = prep
        elif prep is not None:
            lines += ["`@prepare` is unchanged.", ""]
        lines += ["`@decode_layer`:", ""] + dump(cur, "decode_layer")
    lines += ["## The collective ledger of the final module", "",
              "Bytes per device (paper accounting); looped entries are marked.", "", "```"]
    lines += format_ledger(ledger(cur))
    lines += ["```", ""]
    return "\n".join(lines)


# ---- docs/layouts.md --------------------------------------------------------------------------


def collective_table() -> str:
    rows = ["| ffn | attn | collectives in one layer (kind{axes} on dim) | bytes / device / layer |",
            "|---|---|---|---|"]
    for ffn in FFN_LAYOUTS:
        for attn in ATTN_LAYOUTS:
            spec = apply_overrides(load_spec(PALM), ffn=ffn, attn=attn)
            res = compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec, rewrites=False))
            ents = [e for e in ledger(res.module) if e.function == "decode_layer"]
            seq = ", ".join(f"{e.kind}{{{','.join(e.axes)}}}:{e.dims}" for e in ents)
            rows.append(f"| {ffn} | {attn} | {seq} | {sum(e.bytes_per_device for e in ents):,} |")
    return "\n".join(rows)



MIXTRAL = ROOT / "examples" / "mixtral-8x7b.model"


def _moe_layer(spec: Spec):
    res = compile_module(build_for(spec, compile_config(spec)), default_pipeline(spec, rewrites=False))
    return res.module


def expert_table() -> str:
    """The collectives of one Mixtral decode layer for every choice of expert axes."""
    from compiler.cost.moe import expert_axes_choices

    base = load_spec(MIXTRAL)
    rows = ["| expert_axes | expert weights / device | collectives the router, dispatch, experts and combine "
            "ask for (kind{axes}:dims) | bytes / device / layer (whole layer) |", "|---|---|---|---|"]
    for axes in expert_axes_choices(base):
        spec = apply_overrides(base, sets=[f"serve.expert_axes={axes}"])
        m = _moe_layer(spec)
        ents = [e for e in ledger(m) if e.function == "decode_layer"]
        moe = [e for e in ents if any(k in e.reason for k in ("w_router", "dispatch", "we_", "combine"))]
        seq = ", ".join(f"{e.kind}{{{','.join(e.axes)}}}:{e.dims}" for e in moe)
        w = sum(p.type.local_nbytes(m.mesh_sizes) for p in m.function("decode").params_with_role("weight")
                if p.type.has("X") and p.type.has("F"))
        rows.append(f"| {axes} | {w / 2**30:.3f} GiB | {seq} | {sum(e.bytes_per_device for e in ents):,} |")
    return "\n".join(rows)


def moe_block() -> str:
    """Mixtral's MoE block (router to combine) of @decode_layer, experts over x, sliced over y, z."""
    spec = apply_overrides(load_spec(MIXTRAL), batch=64, sets=["serve.expert_axes=x"])
    text = print_function(_moe_layer(spec).function("decode_layer")).splitlines()
    start = next(i for i, ln in enumerate(text) if "w_router" in ln and "=" in ln.split("w_router")[0])
    end = next(i for i, ln in enumerate(text) if " = combine(" in ln)
    return "\n".join(["```", *[ln.strip() for ln in text[start - 1: end + 1]], "```"])


def layouts_section() -> str:
    spec = load_spec(PALM)
    return layer_after_each_pass(spec, default_pipeline(spec, rewrites=False),
                                 "the default pipeline's layout passes for this spec, without the rewrites", {})


def render_layouts() -> str:
    return f"""# Layouts, shown by the compiler

Generated by `docs/generate.py` from `examples/palm-540b.model` (118 layers, 48 heads,
multiquery, parallel SwiGLU block, bf16, mesh x=4, y=4, z=4, decode, batch 64, cache 2048).
Do not edit by hand: run `.venv/bin/python docs/generate.py`. The default pipeline pads the
heads to 64 (`pad-heads`) only where the layout splits them over all 64 chips (`attn = heads`,
or 1D-WS); the other layouts split them over the 16 chips of y and z, which 48 divides.

How to read a type: `bf16[B=64, L=1, E=18432{{x,y,z}}] partial{{x}}` is a [64, 1, 18432] tensor whose
E dim is split over mesh axes x, y, z (x major) and whose blocks are partial sums over x still
to be reduced. Every collective carries the rule that asked for it (`reason`).

## Every layout: the collectives of one decode layer

The FFN layouts are those of reference/partitioning.md §5 and the attention layouts those of §6
(`heads`: sharded over heads, multiquery K/V replicated; `batch`: K/V and the cache over batch,
with the all-to-alls of §6.3). Norm statistics over a sharded E are a small all-reduce.

{collective_table()}

## One layer of PaLM 540B (2d-ws, attn batch) after each pass

{layouts_section()}

## Expert layouts: Mixtral 8x7B

`examples/mixtral-8x7b.model` (8 experts, top-2) on the same mesh, decode, batch 64, 1d-ws and
attention over heads. `serve.expert_axes` names the mesh axes the expert dim X is sharded over
(expert parallelism); the other axes slice each expert's d_ff (expert slicing); `none` slices
every expert over all 64 chips. Attention and the router keep the dense layout. Each row is one
compile; `einshard explain` prices them (`auto` takes the fastest).

{expert_table()}

The MoE block of one decode layer with `expert_axes = x`: the router (replicated, a few KiB) on
the gathered activation, `top_k`, `dispatch` of the tokens' rows into the `[X, C, E]` buffer by
index (C sharded like the tokens), one all-to-all to the experts (X over x), the experts as
einsums over X with F over y, z, the F partial sum reduce-scattered onto E, one all-to-all back
to the tokens, and `combine` with the router weights.

{moe_block()}
"""


# ---- docs/rewrites.md -------------------------------------------------------------------------


def rewrites_section() -> str:
    spec = apply_overrides(load_spec(PALM), **OVERRIDES)
    return layer_after_each_pass(spec, default_pipeline(spec), "the default for this spec", EXPLAIN)


def render_rewrites() -> str:
    return f"""# Rewrites, shown by the compiler

Generated by `docs/generate.py` from `examples/palm-540b.model` (118 layers, 48 heads,
multiquery, parallel SwiGLU block, mesh x=4, y=4, z=4, decode, batch 64, cache 2048) with
`--ffn 2d-ws --attn batch --weights int8 --overlap bidirectional`; this layout splits the heads
over the 16 chips of y and z, which 48 divides, so there is no `pad-heads`. Do not edit by
hand: run `.venv/bin/python docs/generate.py`. The same dumps, whole module, come from

```
{COMMAND}
```

Only one layer (`@decode_layer`) is shown, plus the load-time `@prepare` where it appears or
changes; docs/layouts.md shows the same layer without the rewrites. Types read as in
docs/layouts.md: `E=18432{{x}}` is split over mesh axis x, `partial{{y,z}}` is a partial sum over
y and z still to be reduced.

## One layer after each pass

{rewrites_section()}"""



RENDERERS: dict[str, Callable[[], str]] = {"layouts.md": render_layouts, "rewrites.md": render_rewrites}


def main() -> int:
    stale = []
    for name, render in RENDERERS.items():
        text, path = render(), DOCS / name
        if "--check" in sys.argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"docs/{', docs/'.join(stale)} stale: run .venv/bin/python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
