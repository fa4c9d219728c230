"""Golden IR of every FFN x attention layout on one fixed model, and the order of its collectives.

The model is examples/tiny-mqa.model (parallel block, multiquery attention, SwiGLU, layernorm)
with 8 heads, on the fixed mesh x=2, y=2, z=2, decode phase (batch 8, cache 16), compiled with
the default pipeline (``pad-heads`` only when the heads do not divide - they do here - then
``shard{ffn=..,attn=..},insert-collectives,cleanup``). tests/golden/layouts/<ffn>_<attn>.ir holds
the printed module after a header comment. Regenerate after an intended change with

    EINSHARD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_layouts.py

and review ``git diff tests/golden/layouts``.

The order tests read the *golden files* and check the layer body against the paper's recipes
(reference/partitioning.md §5.1, §5.2, §5.6, §6.1-§6.3, §7), so a regenerated golden file that
drifts from the paper fails there, not silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import apply_overrides, load_spec
from ir.parser import parse_module
from ir.printer import print_module
from partition_helpers import ATTN_LAYOUTS, FFN_LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "tests" / "golden" / "layouts"
UPDATE = os.environ.get("EINSHARD_UPDATE_GOLDEN") == "1"
LAYOUTS = [(f, a) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS]
IDS = [f"{f}_{a}" for f, a in LAYOUTS]
COMM = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


def spec_for(ffn: str, attn: str):
    return apply_overrides(load_spec(ROOT / "examples" / "tiny-mqa.model"), mesh="x=2,y=2,z=2", phase="decode",
                           ffn=ffn, attn=attn, sets=["model.heads=8"])


def header(ffn: str, attn: str, pipeline: str) -> str:
    return (f"// examples/tiny-mqa.model --set model.heads=8 --mesh x=2,y=2,z=2 --phase decode --ffn {ffn} "
            f"--attn {attn}\n// pipeline: {pipeline}\n// regenerate: EINSHARD_UPDATE_GOLDEN=1 .venv/bin/python -m "
            f"pytest tests/test_golden_layouts.py\n")


def compiled_text(ffn: str, attn: str) -> str:
    spec = spec_for(ffn, attn)
    pipeline = default_pipeline(spec, rewrites=False)
    module = compile_module(build_for(spec, compile_config(spec)), pipeline).module
    return header(ffn, attn, pipeline) + print_module(module)


def path(ffn: str, attn: str) -> Path:
    return DIR / f"{ffn}_{attn}.ir"


@pytest.mark.parametrize("ffn,attn", LAYOUTS, ids=IDS)
def test_golden_layout_ir(ffn, attn):
    got = compiled_text(ffn, attn)
    p = path(ffn, attn)
    if UPDATE:
        DIR.mkdir(parents=True, exist_ok=True)
        p.write_text(got)
    assert p.exists(), f"missing {p.relative_to(ROOT)}; run with EINSHARD_UPDATE_GOLDEN=1"
    assert got == p.read_text()


def test_no_stray_golden_layout_files():
    assert {p.name for p in DIR.glob("*.ir")} == {path(f, a).name for f, a in LAYOUTS}


@pytest.mark.parametrize("ffn,attn", LAYOUTS, ids=IDS)
def test_golden_layout_round_trips(ffn, attn):
    text = path(ffn, attn).read_text()
    body = text[text.index("module @"):]
    assert print_module(parse_module(text, str(path(ffn, attn)))) == body


# ---- the order of the collectives in the layer body -------------------------------------------------


def golden_module(ffn: str, attn: str):
    return parse_module(path(ffn, attn).read_text(), str(path(ffn, attn)))


def sequence(ffn: str, attn: str, skip_kv: bool = True) -> list[tuple]:
    """(kind, axes, dims, value) of the communicating collectives in @decode_layer, in order.
    ``skip_kv`` leaves out those on the new K/V rows and positions, which the paper does not
    draw (Fig. 5b: "not stated"); test_kv_projection_collectives covers them."""
    out = []
    for op in golden_module(ffn, attn).function("decode_layer").ops:
        if op.kind not in COMM:
            continue
        base = op.result.split(".")[0]
        if skip_kv and base in ("k", "v", "pos"):
            continue
        dims = getattr(op, "dim", "") or (op.concat_dim + ">" + op.split_dim if op.kind == "all_to_all" else "")
        out.append((op.kind, op.axes, dims, base))
    return out


def test_order_1d_ws_heads():
    """§5.1 with the parallel block (§7): BLE_xyz -> AG(xyz) -> BLE, everything local (attention
    over the heads of this chip, the Megatron FFN), one RS(xyz) of the summed outputs."""
    assert sequence("1d-ws", "heads") == [
        ("all_gather", ("x", "y", "z"), "E", "h"),
        ("reduce_scatter", ("x", "y", "z"), "E", "y"),
    ]


def test_order_1d_ws_batch():
    """§5.1 + §6.3: Q goes from head-sharded to batch-sharded with one all-to-all over all axes
    before the attention einsums, and back after them."""
    assert sequence("1d-ws", "batch") == [
        ("all_gather", ("x", "y", "z"), "E", "h"),
        ("all_to_all", ("x", "y", "z"), "H>B", "q"),
        ("all_to_all", ("x", "y", "z"), "B>H", "attn"),
        ("reduce_scatter", ("x", "y", "z"), "E", "y"),
    ]


def test_order_2d_ws_heads():
    """§5.2 + §5.6 (SwiGLU) + §6.1/§6.2 + §7 (parallel block: one AG(yz), one RS(yz)):
    AG(yz) of the normed input; Q's partial sum over x reduce-scattered onto the heads
    (BLH_yz Q (partialsum-x) -> BLH_xyz Q); attention local; AG(x) of the heads before W_O;
    gate and up each RS(x) onto F, the product AG(x) back to F_yz; one RS(yz) onto E."""
    assert sequence("2d-ws", "heads") == [
        ("all_gather", ("y", "z"), "E", "h"),
        ("reduce_scatter", ("x",), "H", "q"),
        ("all_gather", ("x",), "H", "attn"),
        ("reduce_scatter", ("x",), "F", "gate"),
        ("reduce_scatter", ("x",), "F", "up"),
        ("all_gather", ("x",), "F", "hidden"),
        ("reduce_scatter", ("y", "z"), "E", "y"),
    ]


def test_order_2d_ws_batch():
    """§6.3 (the paper's decode layout): RS(x) onto the heads, all-to-all(xyz) to B_xyz L H Q,
    attention local against the batch-sharded cache, all-to-all(xyz) back to BLH_xyz Q, then
    AG(x) -> BLH_yz Q before W_O; the FFN as in 2D-WS."""
    assert sequence("2d-ws", "batch") == [
        ("all_gather", ("y", "z"), "E", "h"),
        ("reduce_scatter", ("x",), "H", "q"),
        ("all_to_all", ("z", "y", "x"), "H>B", "q"),
        ("all_to_all", ("z", "y", "x"), "B>H", "attn"),
        ("all_gather", ("x",), "H", "attn"),
        ("reduce_scatter", ("x",), "F", "gate"),
        ("reduce_scatter", ("x",), "F", "up"),
        ("all_gather", ("x",), "F", "hidden"),
        ("reduce_scatter", ("y", "z"), "E", "y"),
    ]


@pytest.mark.parametrize("ffn,group", [("wg-x", ("x",)), ("wg-xy", ("x", "y")), ("wg-xyz", ("x", "y", "z"))])
def test_order_weight_gathered_ffn(ffn, group):
    """§5.4: each FFN weight is all-gathered over the WG group just before its einsum, and
    only over that group; the activations stay batch-sharded over it."""
    m = golden_module(ffn, "batch")
    body = m.function("decode_layer")
    ops = list(body.ops)
    types = body.value_types
    for w in ("w_gate", "w_up", "w_down"):
        gathers = [i for i, op in enumerate(ops) if op.kind == "all_gather" and op.operands[0].split(".")[0] == w]
        assert gathers, f"{w} is not gathered"
        axes = {a for i in gathers for a in ops[i].axes}
        assert axes == set(group), f"{w} gathered over {sorted(axes)}, want {group}"
        gathered = ops[gathers[-1]].result
        users = [i for i, op in enumerate(ops) if gathered in op.operands]
        assert len(users) == 1 and ops[users[0]].kind == "einsum" and users[0] > gathers[-1]
        assert set(types[gathered].mesh_axes).isdisjoint(group)
    # the residual stream keeps the batch over the group (at the layer boundary)
    assert set(body.params[0].type.dim("B").axes) == set(group)


def test_kv_projection_collectives():
    """K/V rows under 2D-WS + attn=batch (not drawn in the paper): k and v are partial over x
    and the cache wants B{z,y,x}. The cheapest is a local slice over (z,y) and one RS(x) onto B
    (1/4 of the rows); see tests/test_ledger.py for the planner's version."""
    kv = [s for s in sequence("2d-ws", "batch", skip_kv=False) if s[3] in ("k", "v")]
    assert [(k, a, d) for k, a, d, _ in kv] == [("reduce_scatter", ("x",), "B")] * 2
