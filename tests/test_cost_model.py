"""The cost model's formulas against hand-computed cases and against the paper's formulas.

Part 1: unit cases computed by hand (one einsum, one collective, a looped collective einsum,
the hardware file format, the MFU/cost identities).
Part 2: the paper's formulas at its own settings (reference/partitioning.md §5, §6.4): the per-chip
FFN communication of the Fig. 3 configuration for every FFN layout, the best 2D split of 64
chips (X = sqrt(n E / F) = 4), KV-cache bytes per chip for multihead, head-sharded multiquery
and batch-sharded multiquery. The chip used in part 2 has no per-hop latency so that times are
bytes / bandwidth exactly, as in the paper's formulas.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from compiler.cost.hardware import CHIPS, Chip, chip_from_mapping, get_chip, load_chip_file
from compiler.cost.model import einsum_flops, nominal_params, price
from compiler.driver import build_for, compile_config, compile_module, default_pipeline
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec
from ir.builder import BuildContext, FunctionBuilder
from ir.collectives import AllGather, CollectiveEinsum
from ir.errors import CostError
from ir.module import Module
from ir.ops import Einsum
from ir.types import Dim, TensorType

V4 = CHIPS["tpu-v4"]
V4_NO_LATENCY = replace(V4, hop_latency_s=0.0)


def compiled(model: ModelSpec, mesh, phase: str, batch: int, seq: int, ffn: str, attn: str,
             weights: str = "bf16") -> tuple[Module, int]:
    spec = Spec(model, MeshSpec(tuple(mesh)), ServeSpec(phase=phase, batch=batch, seq=seq, ffn=ffn, attn=attn,
                                                        weights=weights, hardware="tpu-v4"))
    m0 = build_for(spec, compile_config(spec))
    return compile_module(m0, default_pipeline(spec)).module, nominal_params(m0)


# ---- part 1: hand-computed cases --------------------------------------------------------------


def _module(build) -> Module:
    ctx = BuildContext({"x": 4})
    b = FunctionBuilder("step", ctx, entry=True)
    out = build(b)
    fn = b.finish(out)
    return Module("m", (("x", 4),), (fn,))


def test_einsum_flops_by_hand():
    assert einsum_flops("BLE,EF->BLF", dict(B=8, L=16, E=64, F=256)) == 2 * 8 * 16 * 64 * 256
    assert einsum_flops("BLHD,BTD->BHLT", dict(B=2, L=3, H=4, D=5, T=7)) == 2 * 2 * 3 * 4 * 5 * 7
    assert einsum_flops("BLE->BE", dict(B=2, L=3, E=5)) == 2 * 3 * 5  # one operand: no multiply-add pairs


def test_one_sharded_einsum_by_hand():
    """x[B=64, E=512] @ w[E=512, F=2048{x}] on 4 chips: every term computed by hand."""
    B, E, F, n = 64, 512, 2048, 4

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        return [b.emit(Einsum, [x, w], "y", spec="BE,EF->BF")]

    e = price(_module(build), V4, n_params=E * F)
    c = e.per_step
    assert c.flops == 2 * B * E * F / n
    assert c.compute == pytest.approx(2 * B * E * F / n / 275e12, rel=1e-12)
    assert c.weights == pytest.approx(E * F / n * 2 / 1.2e12, rel=1e-12)
    assert c.activations == pytest.approx((B * E + B * F / n) * 2 / 1.2e12, rel=1e-12)
    assert c.kv == 0 and c.comm == 0
    assert e.step_time_s == pytest.approx(max(c.compute, c.weights + c.activations), rel=1e-12)
    assert e.memory.weights == E * F // n * 2
    # MFU (§4.1): 2 n_params FLOPs per token at peak over the step time; cost = n x time / tokens
    assert e.tokens == 1  # no token input: one step counts as one token
    assert e.mfu == pytest.approx(2 * E * F / (n * 275e12) / e.step_time_s, rel=1e-12)
    assert e.cost_chip_ms_per_token == pytest.approx(1e3 * n * e.step_time_s, rel=1e-12)


def test_collective_time_by_hand():
    """The ledger's volume / bandwidth (App. A.1 with (K-1)/K dropped, as the paper's analysis does);
    at least hops x latency where a chip has one."""
    mesh = {"x": 4, "y": 4, "z": 4}
    assert V4.collective_seconds(2.7e9, ("x",), mesh) == pytest.approx(2.7e9 / 270e9)  # the volume, no (K-1)/K
    assert V4.collective_seconds(2.7e9, ("x", "y", "z"), mesh) == pytest.approx(2.7e9 / 270e9)
    slow = replace(V4, hop_latency_s=1e-6)
    # latency-bound: 2 KiB over x, y, z: hops = 2 + 2 + 2, 1 us each
    assert slow.collective_seconds(2048, ("x", "y", "z"), mesh) == pytest.approx(6e-6)
    assert V4.collective_seconds(2048, ("x", "y", "z"), mesh) == pytest.approx(2048 / 270e9)
    assert V4.collective_seconds(0, ("x",), mesh) == 0.0
    assert V4.collective_seconds(1e6, ("x",), {"x": 1}) == 0.0  # one participant: nothing moves
    assert CHIPS["h100"].hops(("x", "y"), {"x": 4, "y": 2}) == 1  # NVSwitch: one hop


def test_exposed_all_gather_adds_to_the_einsum():
    B, E, F = 256, 1024, 4096

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E, ("x",)))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        g = b.emit(AllGather, [x], "g", axes=("x",), dim="E")
        return [b.emit(Einsum, [g, w], "y", spec="BE,EF->BF")]

    e = price(_module(build), V4_NO_LATENCY)
    ops = {p.kind: p for p in e.ops}
    assert ops["all_gather"].comm_s == pytest.approx(B * E * 2 / 270e9)  # AG: its output (the paper's volume)
    assert e.step_time_s == pytest.approx(ops["einsum"].time_s + ops["all_gather"].comm_s)
    assert e.per_step.comm_exposed == pytest.approx(ops["all_gather"].comm_s)


def test_looped_collective_einsum_overlaps():
    """A K-step loop overlaps each chunk's transfer with the previous chunk's einsum, and the
    first chunk's einsum has nothing beside it: time = max(E, C + E / K), only time - E exposed."""
    B, E, F, K = 256, 1024, 4096, 4

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E, ("x",)))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        return [b.emit(CollectiveEinsum, [x, w], "y", collective="all_gather", axes=("x",), dim="E",
                       specs=("BE,EF->BF",))]

    e = price(_module(build), V4_NO_LATENCY)
    (op,) = e.ops
    assert op.looped
    assert op.flops == 2 * B * E * F / K  # the einsum's FLOPs, on the gathered E
    work = max(op.compute_s, op.memory_s)
    assert op.comm_s > 0
    assert op.time_s == pytest.approx(max(work, op.comm_s + work / K), rel=1e-12)
    assert op.exposed_comm_s == pytest.approx(max(0.0, op.time_s - work), rel=1e-12)
    assert op.time_s < work + op.comm_s  # overlapped, unlike an exposed collective


def test_looped_collective_einsum_runs_at_its_chunks_efficiency():
    """Each of the K loop steps multiplies one chunk, the gathered dim 1/K as long, so the
    calibrated FLOP/s fraction is that of the chunk's smallest dim: here the contraction E / K =
    256 (rows B = 2048, local columns F = 1024), not the gathered E = 1024."""
    from compiler.cost.efficiency import Efficiency

    B, E, F, K = 2048, 1024, 4096, 4

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E, ("x",)))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        return [b.emit(CollectiveEinsum, [x, w], "y", collective="all_gather", axes=("x",), dim="E",
                       specs=("BE,EF->BF",))]

    eff = Efficiency(flops=0.8, matmul_half=256.0, source="test")
    (op,) = price(_module(build), V4_NO_LATENCY, eff=eff).ops
    assert op.compute_s == pytest.approx(op.flops / (V4.peak("bf16") * 0.8 * 256 / (256 + 256)), rel=1e-12)


def _gathered_weight_module(B: int, E: int, F: int, act_gather: bool):
    """x[B, E] @ all_gather(w[E, F{x}]) and, with ``act_gather``, x itself gathered over x first."""

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E, ("x",) if act_gather else ()))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        if act_gather:
            x = b.emit(AllGather, [x], "xg", axes=("x",), dim="E")
        wg = b.emit(AllGather, [w], "wg", axes=("x",), dim="F")
        return [b.emit(Einsum, [x, wg], "y", spec="BE,EF->BF")]

    return _module(build)


@pytest.mark.parametrize("B", [16, 4096])
def test_weight_collectives_are_prefetched_beside_compute_only(B):
    """With overlap on, a weight's all-gather (it depends on no activation) runs ahead of its
    einsum, hidden only behind compute that leaves the links free: time = T + max(0, W - H), T the
    op times, W the weight collectives, H the compute of the ops that are not exposed collectives.
    The next call's gathered weight is held meanwhile (memory). With overlap = none it is exposed."""
    E, F = 1024, 4096
    for act_gather in (False, True):
        m = _gathered_weight_module(B, E, F, act_gather)
        e = price(m, V4_NO_LATENCY, overlap="looped")
        ops = {p.value: p for p in e.ops}
        W = ops["wg"].comm_s
        assert W == pytest.approx(E * F * 2 / 270e9)  # the gathered weight (the paper's volume)
        assert ops["wg"].exposed_comm_s == 0 and ops["wg"].time_s == 0  # priced beside the others
        A = ops["xg"].comm_s if act_gather else 0.0
        T = sum(p.time_s for p in e.ops)
        H = ops["y"].compute_s
        assert e.step_time_s == pytest.approx(T + max(0.0, W - H), rel=1e-12)
        assert e.per_step.comm_exposed == pytest.approx(A + max(0.0, W - H), rel=1e-12)
        assert e.per_step.comm == pytest.approx(W + A, rel=1e-12)
        assert e.memory.prefetch == E * F * 2  # the next call's gathered weight, held ahead
        none = price(m, V4_NO_LATENCY, overlap="none")
        assert none.step_time_s == pytest.approx(T + W, rel=1e-12) and none.memory.prefetch == 0
    # small batch: the gather outlasts the matmul and is exposed; large batch: it hides under it
    small = price(_gathered_weight_module(16, E, F, False), V4_NO_LATENCY, overlap="looped")
    assert small.per_step.comm_exposed > 0
    big = price(_gathered_weight_module(4096, E, F, False), V4_NO_LATENCY, overlap="looped")
    assert big.per_step.comm_exposed == 0


def test_unknown_op_kind_is_priced_as_memory_traffic():
    from compiler.cost.model import OP_RULES, View, _elementwise

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", 8), Dim("E", 64))), "input")
        return [b.emit(Einsum, [x, x], "y", spec="BE,BE->BE")]

    m = _module(build)
    fn = m.entries[0]
    op = fn.ops[0].with_()
    object.__setattr__(op, "kind", "some_future_op")  # an op kind no rule knows
    assert "some_future_op" not in OP_RULES
    m2 = m.with_function(fn.with_ops([op]))
    e = price(m2, V4)
    assert e.ops[0].flops == 0
    c = _elementwise(View(op, m2.entries[0], m2.mesh_sizes, {"x": 8 * 64 * 2}, {}))
    assert sum(e.ops[0].bytes.values()) == sum(c.reads.values()) + c.writes == 3 * 8 * 64 * 2


def test_chip_file(tmp_path):
    p = tmp_path / "chip.toml"
    p.write_text('name = "toy"\nflops_bf16 = 1e14\nhbm_bytes = 1073741824\nhbm_bw = 1e12\nici_bw = 1e11\n'
                 'topology = "switch"\n')
    chip = load_chip_file(p)
    assert (chip.name, chip.peak("bf16"), chip.peak("f32"), chip.hbm_bytes, chip.topology) == \
        ("toy", 1e14, 1e14, 1 << 30, "switch")
    assert get_chip(str(p)) == chip
    p.write_text('name = "toy"\nflops_bf16 = 1e14\nhbm_bytes = 1\nhbm_bw = 1e12\nici_bw = 1e11\nhbm_bandwith = 3\n')
    with pytest.raises(CostError, match="unknown chip field 'hbm_bandwith'"):
        load_chip_file(p)
    with pytest.raises(CostError, match=r"must be (a positive number|> 0)"):
        chip_from_mapping({"name": "z", "flops_bf16": 1e14, "hbm_bytes": 1, "hbm_bw": -1, "ici_bw": 1}, "test")
    with pytest.raises(CostError, match="unknown hardware 'tpu-v3'"):
        get_chip("tpu-v3")


def test_every_table_chip_is_valid():
    for name, chip in CHIPS.items():
        assert isinstance(chip, Chip) and chip.name == name and chip.source
        assert chip.peak("bf16") > 1e13 and chip.hbm_bw > 1e11 and chip.ici_bw > 1e10 and chip.hbm_bytes > 8 << 30
    assert V4.peak("bf16") == 275e12 and V4.hbm_bw == 1.2e12 and V4.ici_bw == 270e9 and V4.hbm_bytes == 32 << 30


def test_palm_540b_ideal_cost_and_mfu():
    """§4.1: MFU = (2 n_params / peak) / cost; the ideal cost of 540B is 3.93 chip-ms per token."""
    model = ModelSpec("palm-540b", layers=118, d_model=18432, heads=48, kv_heads=1, d_head=256, d_ff=73728,
                      vocab=256000, block="parallel", mlp="swiglu", tie_embeddings=True)
    m, n = compiled(model, (("x", 4), ("y", 4), ("z", 4)), "decode", 64, 2048, "2d-ws", "batch")
    assert round(n / 1e9, 1) == 540.4  # nominal: 48 heads, not the 64 the compiler pads to
    e = price(m, V4, n)
    ideal_ms = 2 * n / 275e12 * 1e3
    assert round(ideal_ms, 2) == 3.93
    assert e.mfu * e.cost_chip_ms_per_token == pytest.approx(ideal_ms, rel=1e-12)


# ---- part 2: the paper's formulas at its own settings ----------------------------------------

X = Y = Z = 4
E, F = 16384, 65536
FIG3_MESH = (("x", X), ("y", Y), ("z", Z))
FIG3 = ModelSpec("fig3", layers=2, d_model=E, heads=128, kv_heads=128, d_head=128, d_ff=F, vocab=256,
                 block="serial", mlp="gelu", norm="layernorm", bias="none")
FFN_VALUES = ("h2", "hidden", "mlp_out", "w_in", "w_out")


def paper_ffn_steps(ffn: str, B: int, L: int, x: int = X, yz: int = Y * Z) -> list[tuple[int, int]]:
    """Per-chip FFN collectives as (elements, participants K): reference §5.1, §5.2 and the §5.4
    table (an all-gather counts its output, a reduce-scatter its input)."""
    n = x * yz
    BLE, BLF = B * L * E, B * L * F
    return {
        "1d-ws": [(BLE, n), (BLE, n)],  # AG(xyz) out BLE, RS(xyz) in BLE
        "2d-ws": [(BLE // x, yz), (BLF // yz, x), (BLF // yz, x), (BLE // x, yz)],
        "wg-x": [(BLE // x, yz), (E * F // yz, x), (E * F // yz, x), (BLE // x, yz)],
        "wg-xy": [(BLE // (X * Y), Z), (E * F // Z, X * Y), (E * F // Z, X * Y), (BLE // (X * Y), Z)],
        "wg-xyz": [(E * F, n), (E * F, n)],
    }[ffn]


def paper_ffn_elements(ffn: str, B: int, L: int, x: int = X, yz: int = Y * Z) -> int:
    """The paper's per-chip volume, (K-1)/K dropped: 2BLE (1D), 2BL(E/X + F/YZ) (2D), ..."""
    return sum(el for el, _ in paper_ffn_steps(ffn, B, L, x, yz))


def paper_ffn_seconds(ffn: str, B: int, L: int, x: int = X, yz: int = Y * Z) -> float:
    """The paper's volumes ((K-1)/K dropped, as its analysis does; a 1-way "collective" moves
    nothing), 2 bytes per element, 270 GB/s."""
    return sum(el * 2 for el, k in paper_ffn_steps(ffn, B, L, x, yz) if k > 1) / 270e9


def ffn_comm_seconds(m: Module, chip: Chip) -> float:
    e = price(m, chip)
    return sum(p.comm_s for p in e.ops if p.function.endswith("_layer") and p.value.split(".")[0] in FFN_VALUES
               and p.kind != "norm")


@pytest.mark.parametrize("ffn", ["1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz"])
@pytest.mark.parametrize("B,L,phase", [(64, 1, "decode"), (512, 1, "decode"), (64, 128, "prefill")])
def test_fig3_ffn_communication_time(ffn, B, L, phase):
    """The model's FFN communication time per layer = the §5 per-chip volumes x 2 bytes / 270 GB/s,
    the paper's closed forms (2BLE, 2BL(E/X + F/YZ), ...)."""
    m, _ = compiled(FIG3, FIG3_MESH, phase, B, L if phase == "prefill" else 2048, ffn, "heads")
    got = ffn_comm_seconds(m, V4_NO_LATENCY)
    assert got == pytest.approx(paper_ffn_seconds(ffn, B, L), rel=1e-12)
    assert got == pytest.approx(paper_ffn_elements(ffn, B, L) * 2 / 270e9, rel=1e-12)


def test_best_2d_split_of_64_chips():
    """§5.2: T_comm = 2BL(E/X + F/YZ)/bw is smallest at X = sqrt(n E / F) = 4 for n = 64, F = 4E,
    where it equals 8 B L E / (sqrt(n) bw). The model finds the same split among all X x YZ = 64."""
    B, L, n = 64, 1, 64
    times, closed = {}, {}
    for x in (1, 2, 4, 8, 16, 32):
        m, _ = compiled(FIG3, (("x", x), ("y", n // x)), "decode", B, 2048, "2d-ws", "heads")
        times[x] = ffn_comm_seconds(m, V4_NO_LATENCY)
        assert times[x] == pytest.approx(paper_ffn_seconds("2d-ws", B, L, x, n // x), rel=1e-12)
        closed[x] = paper_ffn_elements("2d-ws", B, L, x, n // x) * 2 / 270e9
    best = min(times, key=times.get)
    assert best == min(closed, key=closed.get) == math.isqrt(n * E // F) == 4
    assert closed[best] == pytest.approx(8 * B * L * E * 2 / (math.sqrt(n) * 270e9), rel=1e-12)


# Multihead uses 1d-ws, whose head axes are all of x, y, z. (Under 2d-ws the compiler keeps the
# cache on the weights' head axes {z,y}, i.e. KV_total / 16 on 64 chips, where Fig. 5a has H_xyz.)
@pytest.mark.parametrize("attention,ffn,attn,divide", [("multihead", "1d-ws", "heads", True),
                                                       ("multiquery", "2d-ws", "heads", False),
                                                       ("multiquery", "2d-ws", "batch", True)])
def test_kv_cache_bytes_per_chip(attention, ffn, attn, divide):
    """§6.4: KV_total = 2 n_layers B L_ctx n_kv_heads d_head bytes; per chip /n for multihead and
    batch-sharded multiquery, the whole cache for head-sharded multiquery."""
    layers, B, T, H, D = 4, 64, 1024, 64, 128
    kv_heads = H if attention == "multihead" else 1
    model = ModelSpec("kv", layers=layers, d_model=1024, heads=H, kv_heads=kv_heads, d_head=D, d_ff=4096,
                      vocab=256, block="parallel", mlp="swiglu")
    m, _ = compiled(model, FIG3_MESH, "decode", B, T, ffn, attn)
    total = 2 * layers * B * T * kv_heads * D * 2
    e = price(m, V4)
    assert e.memory.kv == (total // 64 if divide else total)
    # KV memory time per decode step = per-chip KV bytes / HBM bandwidth (the attention reads it once)
    assert e.per_step.kv >= e.memory.kv / 1.2e12


def test_chip_file_efficiency_table(tmp_path):
    """A chip file's [efficiency] table drives the calibrated model; the bound ignores it; its
    fields and values are checked with the file named."""
    from compiler.cost.efficiency import BOUND, efficiency_for

    base = 'name = "toy"\nflops_bf16 = 1e14\nhbm_bytes = 1073741824\nhbm_bw = 1e12\nici_bw = 1e11\n'
    p = tmp_path / "chip.toml"
    p.write_text(base + '[efficiency]\nflops = 0.5\nhbm = 0.25\nlayer_overhead_s = 1e-5\nsource = "my fit"\n')
    chip = load_chip_file(p)
    eff = efficiency_for(chip)
    assert (eff.flops, eff.hbm, eff.link, eff.layer_overhead_s, eff.source) == (0.5, 0.25, 1.0, 1e-5, "my fit")
    assert efficiency_for(chip, "bound") is BOUND and efficiency_for(load_chip_file(_plain(tmp_path, base))) is BOUND
    B, E, F = 64, 512, 2048

    def build(b):
        x = b.param("x", TensorType("bf16", (Dim("B", B), Dim("E", E))), "input")
        w = b.param("w", TensorType("bf16", (Dim("E", E), Dim("F", F, ("x",)))), "weight")
        return [b.emit(Einsum, [x, w], "y", spec="BE,EF->BF")]

    m = _module(build)
    bound, cal = price(m, chip), price(m, chip, eff=eff)
    (b_op,), (c_op,) = bound.ops, cal.ops
    assert c_op.compute_s == pytest.approx(b_op.compute_s / 0.5)
    assert c_op.memory_s == pytest.approx(b_op.memory_s / 0.25)
    assert cal.step_time_s == pytest.approx(max(c_op.compute_s, c_op.memory_s) + 1e-5)
    for table, message in (("flops = 2\n", "efficiency flops must be in (0, 1]"),
                           ("hbmm = 0.5\n", "unknown efficiency field 'hbmm'"),
                           ("link = \"fast\"\n", "must be a finite number")):
        p.write_text(base + "[efficiency]\n" + table)
        with pytest.raises(CostError, match=re.escape(message)):
            load_chip_file(p)


def _plain(tmp_path, text):
    q = tmp_path / "plain.toml"
    q.write_text(text)
    return q


def test_cpu_fit_is_stored_with_its_probe_and_goes_stale_with_it(tmp_path):
    """bench/cost_model_vs_measured.py --fit stores the cpu chip's efficiencies beside the probe's
    cache; get_chip('cpu') attaches them while the probe's figures are the ones fitted against."""
    import json as _json

    from compiler.cost.efficiency import CPU_FIT_FILE, Efficiency, efficiency_for, load_cpu_fit, save_cpu_fit

    probe = {"name": "cpu", "flops_f32": 1e11, "flops_bf16": 5e10, "hbm_bw": 2e10, "ici_bw": 1e10,
             "hbm_bytes": 1 << 34, "op_overhead_s": 2e-6, "topology": "shared-memory", "source": "test"}
    eff = Efficiency(flops=0.4, matmul_half=32.0, hbm=0.6, layer_overhead_s=1e-5, source="fit")
    save_cpu_fit(tmp_path / CPU_FIT_FILE, probe, eff)
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, probe) == eff
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, {**probe, "hbm_bw": 3e10}) is None  # re-measured: stale
    assert load_cpu_fit(tmp_path / "absent.json", probe) is None
    import time

    from runtime.probe import PROBE_VERSION, machine_key

    key = machine_key()
    (tmp_path / "cpu-probe.json").write_text(_json.dumps({
        "version": PROBE_VERSION, "key": key, "figures": probe,
        "measured": {"unix": time.time(), "load_before": 0.5, "load_after": 0.6, "duration_s": 5.0}}))
    chip = get_chip("cpu", tmp_path)
    assert chip.efficiency == eff and efficiency_for(chip) == eff and efficiency_for(chip, "bound").is_bound
    assert chip.measured_at > 0 and chip.probe_info.endswith(f"cached in {tmp_path / 'cpu-probe.json'}")
    # a keyed fit (bench/cost_model_vs_measured.py stores the probe's machine key) holds its
    # fractions when the probe is measured again under that key, and says what it was fitted to
    save_cpu_fit(tmp_path / CPU_FIT_FILE, probe, eff, key)
    faster = {**probe, "flops_f32": 2.5e11, "hbm_bw": 4e10}
    kept = load_cpu_fit(tmp_path / CPU_FIT_FILE, faster, key)
    assert kept is not None and (kept.flops, kept.hbm, kept.matmul_half) == (0.4, 0.6, 32.0)
    assert "fitted against a probe of 100 GFLOP/s f32, 20 GB/s" in kept.source
    assert "current probe's 250 GFLOP/s, 40 GB/s" in kept.source
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, faster, {**key, "jax": "0.0.1"}) is None  # other software
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, faster) is None  # no key to check against


def test_chip_description_keeps_four_significant_digits():
    """explain's hardware line: a measured chip's figures in 4 significant digits like the
    table's (18.81 GB/s, not 18.8139), the datasheet figures unchanged."""
    cpu = chip_from_mapping({"name": "cpu", "flops_bf16": 4.68237e10, "hbm_bytes": 25276510208,
                             "hbm_bw": 18813890162.3, "ici_bw": 3171728741.9, "topology": "shared-memory"}, "test")
    assert cpu.describe() == ("cpu: 0.04682 TFLOP/s bf16, HBM 23.54 GiB at 18.81 GB/s, interconnect 3.172 GB/s "
                              "(shared-memory)")
    assert V4.describe() == "tpu-v4: 275 TFLOP/s bf16, HBM 32 GiB at 1200 GB/s, interconnect 270 GB/s (torus)"
