"""Regenerates docs/rewrites.md from the compiler itself: one PaLM 540B layer after every pass of
the default pipeline with the rewrites on (fusion, int8, bidirectional collective einsums).

    .venv/bin/python docs/generate_rewrites.py          # rewrite docs/rewrites.md
    .venv/bin/python docs/generate_rewrites.py --check  # exit 1 if it is stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from compiler.driver import build_for, compile_config, default_pipeline
from compiler.spec import apply_overrides, load_spec
from ir.printer import print_function
from passes.ledger import format_ledger, ledger
from passes.manager import Instrumentation, PassManager
from passes.pipeline import Pipeline, parse_pipeline

OUT = ROOT / "docs" / "rewrites.md"
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


def spec():
    return apply_overrides(load_spec(PALM), **OVERRIDES)


def dump(module, name: str) -> list[str]:
    try:
        fn = module.function(name)
    except KeyError:
        return []
    return ["```", print_function(fn).rstrip(), "```", ""]


def passes_section() -> str:
    s = spec()
    module = build_for(s, compile_config(s))
    pipeline = default_pipeline(s)
    lines = [f"Pipeline: `{pipeline}` (the default for this spec).", ""]
    lines += ["### Input (the builder's unsharded layer)", ""] + dump(module, "decode_layer")
    cur = module
    prepare_text = None
    for p in parse_pipeline(pipeline).passes:
        rec = PassManager(Pipeline((p,)), Instrumentation()).run(cur)
        r = rec.records[0]
        cur = rec.module
        lines += [f"### After `{r.spelled}`", "", EXPLAIN.get(p.name, ""), ""]
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


def render() -> str:
    return f"""# Rewrites, shown by the compiler

Generated by `docs/generate_rewrites.py` from `examples/palm-540b.model` (118 layers, 48 heads,
multiquery, parallel SwiGLU block, mesh x=4, y=4, z=4, decode, batch 64, cache 2048) with
`--ffn 2d-ws --attn batch --weights int8 --overlap bidirectional`; this layout splits the heads
over the 16 chips of y and z, which 48 divides, so there is no `pad-heads`. Do not edit by
hand: run `.venv/bin/python docs/generate_rewrites.py`. The same dumps, whole module, come from

```
{COMMAND}
```

Only one layer (`@decode_layer`) is shown, plus the load-time `@prepare` where it appears or
changes; docs/layouts.md shows the same layer without the rewrites. Types read as in
docs/layouts.md: `E=18432{{x}}` is split over mesh axis x, `partial{{y,z}}` is a partial sum over
y and z still to be reduced.

## One layer after each pass

{passes_section()}"""


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/rewrites.md is stale: run .venv/bin/python docs/generate_rewrites.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
