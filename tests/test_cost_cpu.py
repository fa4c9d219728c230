"""What the cost model charges a CPU decode step, checked against what the step holds.

bench/cost_model_vs_measured.py --smollm2 compares predictions with measured SmolLM2 steps; these
tests pin the byte counts that comparison rests on: every weight is read once per decode step
(int8 weights as int8 bytes plus their scales), the tied embedding table once more by the
logits, and the KV cache over the compiled context only. And the probe that the benchmark
samples between its own measurements (runtime/probe.py's CpuProbe) gives a chip, and a fit is
found only against the probe figures it was stored with.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from compiler.cost.efficiency import CPU_FIT_FILE, Efficiency, load_cpu_fit, save_cpu_fit
from compiler.cost.hardware import chip_from_mapping
from compiler.cost.model import price
from compiler.generation import module_for
from compiler.spec import ModelSpec, Spec, apply_overrides

MODEL = ModelSpec(name="llama-small", layers=3, d_model=64, heads=4, kv_heads=2, d_head=16, d_ff=128, vocab=512,
                  block="serial", mlp="swiglu", norm="rmsnorm", tie_embeddings=True)
CHIP = chip_from_mapping({"name": "cpu", "flops_f32": 1e11, "flops_bf16": 5e10, "hbm_bw": 2e10, "ici_bw": 5e9,
                          "hbm_bytes": 8 << 30, "topology": "shared-memory", "op_overhead_s": 2e-6}, "test")


def step_bytes(module, cls: str) -> float:
    """Bytes of class ``cls`` one step reads and writes, layer bodies counted once per layer."""
    e = price(module, CHIP)
    entry = module.entries[0].name
    return sum(o.bytes.get(cls, 0.0) * (1 if o.function == entry else e.layers) for o in e.ops)


def weight_params(module) -> dict[str, int]:
    fn = module.entries[0]
    return {p.name: p.type.local_nbytes(module.mesh_sizes) for p in fn.params_with_role("weight")}


@pytest.mark.parametrize("fmt", ["f32", "int8"])
def test_decode_reads_every_weight_once_and_the_tied_table_for_the_logits(fmt):
    m = module_for(apply_overrides(Spec(MODEL), weights=fmt), "decode", 1, 1, 64)
    held = weight_params(m)
    embed_type = next(p.type for p in m.entries[0].params if p.name == "embed")
    row = (embed_type.local_nbytes(m.mesh_sizes) + held.get("embed_scale", 0)) // MODEL.vocab  # int8: + its scale
    # the norms' scales are fused into the einsums after them and not charged (0.01% of SmolLM2's bytes)
    norms = sum(held.pop(n) for n in ("ln1_scale", "ln2_scale", "final_scale"))
    assert norms < sum(held.values()) / 100
    # the logits read the whole tied table, the embedding gather one row of it
    assert step_bytes(m, "weight") == pytest.approx(sum(held.values()) + row)


def test_int8_weights_are_priced_from_their_int8_bytes():
    f32 = module_for(apply_overrides(Spec(MODEL), weights="f32"), "decode", 1, 1, 64)
    i8 = module_for(apply_overrides(Spec(MODEL), weights="int8"), "decode", 1, 1, 64)
    held = weight_params(i8)
    i8_types = {p.name: p.type for p in i8.entries[0].params_with_role("weight")}
    projections = [n for n, t in i8_types.items() if t.dtype == "i8"]
    assert {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"} <= set(projections)
    n_i8 = sum(held[n] for n in projections)
    f32_held = weight_params(f32)
    # one byte per int8 element against four per f32 element of the same projections
    assert n_i8 * 4 == sum(f32_held[n] for n in projections)
    assert step_bytes(i8, "weight") < step_bytes(f32, "weight") / 2
    assert price(i8, CHIP).per_step.weights < price(f32, CHIP).per_step.weights / 2


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_kv_bytes_follow_the_compiled_context(batch):
    spec = apply_overrides(Spec(MODEL), weights="f32")
    per_position = 2 * MODEL.layers * batch * MODEL.kv_heads * MODEL.d_head * 4  # K and V, f32
    for context in (64, 512):
        m = module_for(spec, "decode", batch, 1, context)
        written = 2 * MODEL.layers * batch * MODEL.kv_heads * MODEL.d_head * 4  # the new position, in place
        assert step_bytes(m, "kv") == per_position * context + written  # exact: whole f32 K and V
    short, long = (price(module_for(spec, "decode", batch, 1, c), CHIP).step_time_s for c in (64, 512))
    assert short < long


def test_probe_sampled_in_a_run_gives_a_chip_and_keys_a_fit(tmp_path):
    from runtime import probe

    p = probe.CpuProbe()
    figures = p.sample(1)
    for k in ("flops_f32", "flops_bf16", "hbm_bw", "ici_bw"):
        assert figures[k] > 0, k
    assert figures["hbm_bw"] >= figures["ici_bw"] and figures["op_overhead_s"] >= 0
    data = probe.chip_fields(figures)
    chip = chip_from_mapping(data, "sampled")
    assert chip.hbm_bw == figures["hbm_bw"] and chip.peak("f32") == figures["flops_f32"]
    # a fit stored against these figures is found; against others it is stale
    eff = Efficiency(flops=0.5, hbm=0.4, layer_overhead_s=1e-5, source="test")
    save_cpu_fit(tmp_path / CPU_FIT_FILE, data, eff)
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, data) == eff
    assert load_cpu_fit(tmp_path / CPU_FIT_FILE, {**data, "hbm_bw": data["hbm_bw"] * 2}) is None


def test_a_matrix_vector_product_keeps_the_full_flops_fraction():
    e = Efficiency(flops=0.5, matmul_half=16.0)
    assert e.flops_fraction(1) == 0.5  # a gemv: its own kernel, bound by the bytes it streams
    assert e.flops_fraction(8) == pytest.approx(0.5 * 8 / 24)
    assert e.flops_fraction(1024) == pytest.approx(0.5 * 1024 / 1040)


def test_the_shape_term_makes_batch_8_decode_cost_more_than_batch_1():
    """XLA CPU runs an 8-row decode matmul 2-3x slower than the 1-row one (a gemv); a roofline
    with one FLOP/s fraction sees both bound by the same weight bytes."""
    chip = replace(CHIP, op_overhead_s=0.0)
    wide = replace(MODEL, name="llama-wide", layers=2, d_model=256, d_ff=1024, heads=4, kv_heads=2, d_head=64)
    spec = apply_overrides(Spec(wide), weights="f32")  # weights (8 MB) dominate a decode step's bytes
    one, eight = (module_for(spec, "decode", b, 1, 64) for b in (1, 8))
    flat = Efficiency(flops=0.5, hbm=0.5)
    shaped = Efficiency(flops=0.5, matmul_half=16.0, hbm=0.5)
    t = {(b, e): price(m, chip, eff=e).step_time_s for b, m in ((1, one), (8, eight)) for e in (flat, shaped)}
    assert t[(8, flat)] < 1.2 * t[(1, flat)]
    assert t[(8, shaped)] > 1.5 * t[(1, shaped)]
    assert t[(1, shaped)] == pytest.approx(t[(1, flat)], rel=0.05)  # batch 1 stays memory-bound


def _narrow_weight_elements(module) -> int:
    """Elements of the weights a decode step multiplies that are held narrower than f32: every
    int8 projection (read through its dequantize) and the bf16 tied table (read by the logits),
    counted from the entry's params, layer bodies once per layer (their params are N-stacked)."""
    fn = module.entries[0]
    n = 0
    for p in fn.params_with_role("weight"):
        if p.type.dtype in ("i8", "bf16") and p.name not in ("ln1_scale", "ln2_scale", "final_scale"):
            n += p.type.local_nbytes(module.mesh_sizes) // {"i8": 1, "bf16": 2}[p.type.dtype]
    return n


@pytest.mark.parametrize("fmt", ["f32", "int8", "bf16"])
def test_narrow_weights_are_charged_their_convert_per_element(fmt):
    """A CPU multiplies int8 and bf16 weights in f32: the convert is work on every element the
    step reads (int8 decode ran as slow as f32 although it reads a quarter of the bytes), priced
    at ``convert_s`` per element; f32 weights convert nothing, and the bound charges nothing."""
    chip = replace(CHIP, op_overhead_s=0.0)
    m = module_for(apply_overrides(Spec(MODEL), weights=fmt), "decode", 1, 1, 64)
    plain = Efficiency(flops=0.5, hbm=0.5)
    per = 1e-9
    a, b = price(m, chip, eff=plain), price(m, chip, eff=replace(plain, convert_s=per))
    # the norms' scales are read by fused norms, not by a dot: not converted
    expected = 0 if fmt == "f32" else _narrow_weight_elements(m)
    assert expected == 0 or expected > MODEL.vocab * MODEL.d_model  # at least the table
    assert (b.per_step.compute - a.per_step.compute) / per == pytest.approx(expected)
    assert price(m, chip).step_time_s == price(m, chip, eff=replace(Efficiency(), source="x")).step_time_s
    if fmt != "f32":  # the converts make this small step compute-bound: it costs more than its bytes
        assert b.step_time_s > a.step_time_s


def test_convert_cost_is_validated_and_read_from_a_chip_file(tmp_path):
    from compiler.cost.hardware import load_chip_file
    from ir.errors import CostError

    with pytest.raises(CostError, match="convert_s must be >= 0"):
        Efficiency(convert_s=-1e-9)
    assert not Efficiency(convert_s=1e-10).is_bound
    p = tmp_path / "chip.toml"
    p.write_text('name = "toy"\nflops_bf16 = 1e11\nhbm_bytes = 1073741824\nhbm_bw = 1e10\nici_bw = 1e10\n'
                 '[efficiency]\nflops = 0.5\nconvert_s = 4e-10\n')
    assert load_chip_file(p).efficiency.convert_s == 4e-10


@pytest.mark.slow  # ~40 s: the replay fits five efficiencies several times over (least squares)
def test_smollm2_replay_recovers_the_efficiencies_that_made_its_samples(tmp_path):
    """bench/cost_model_vs_measured.py --replay prices a saved --smollm2 run again. Fed samples
    that the cost model itself made with known efficiencies (int8 convert included), the fit on
    the fit models' cases must predict the held-out model exactly: what the fit can express, it
    recovers, and the held-out model is priced by the same rules (no JAX step is run)."""
    import json
    import re
    import subprocess
    import sys
    from dataclasses import asdict

    from conftest import ROOT

    figures = {"flops_f32": 1e11, "flops_bf16": 5e10, "hbm_bw": 2e10, "ici_bw": 1e10, "op_overhead_s": 2e-6}
    chip = chip_from_mapping({"name": "cpu", **figures, "hbm_bytes": 8 << 30, "hop_latency_s": 0.0,
                              "topology": "shared-memory"}, "test")
    truth = Efficiency(flops=0.5, matmul_half=16.0, hbm=0.6, layer_overhead_s=2e-5, convert_s=3e-10)
    models = [replace(MODEL, name="fit-a", d_model=128, d_ff=384, heads=4, kv_heads=2, d_head=32),
              replace(MODEL, name="fit-b", layers=6, d_model=96, d_ff=256, heads=6, kv_heads=3, d_head=16),
              replace(MODEL, name="held", layers=4, d_model=192, d_ff=512, heads=6, kv_heads=2, d_head=32)]
    cases = []
    for m in models:
        held = m.name == "held"
        for fmt, phase, batch, length in (("f32", "decode", 1, 1), ("f32", "decode", 8, 1),
                                          ("f32", "prefill", 1, 64), ("int8", "decode", 1, 1)):
            context = 64 if phase == "decode" else 128
            module = module_for(apply_overrides(Spec(m), weights=fmt), phase, batch, length, context)
            t = price(module, chip, eff=truth).step_time_s
            tag = "" if fmt == "f32" else f" {fmt}"
            label = f"{m.name}{tag} decode B={batch}" if phase == "decode" else f"{m.name} prefill {length}"
            cases.append(dict(label=label, held_out=held, samples=[0.98 * t, t, 1.02 * t],
                              shape=dict(model=asdict(m), weights=fmt, phase=phase, batch=batch, length=length,
                                         context=context)))
    cached = {"name": "cpu", **figures, "hbm_bytes": 8 << 30, "hop_latency_s": 0.0, "topology": "shared-memory",
              "source": "test"}  # as runtime/probe.py caches it
    run = dict(probe=cached, figures=[figures] * 3, load=[[1.0, 1]] * 4, prompt=8, steps=4, prefill=64,
               cache_len=128, cases=cases)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_model_vs_measured.py"), "--replay", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("SmolLM2 f32 predicted / measured:"))
    ratios = [float(v) for v in re.findall(r"\d+\.\d+", line.split(":")[1].split("(")[0])]
    assert len(ratios) == 3 and all(abs(q - 1) <= 0.02 for q in ratios), line
    held_int8 = next(x for x in r.stdout.splitlines() if x.startswith("held int8 decode B=1 (held out)"))
    assert abs(float(held_int8.split()[-1]) - 1) <= 0.02, held_int8
    assert "; not stored with the in-run probe" in r.stdout  # a replay leaves the stored fit alone


def _fake_probe(monkeypatch, tmp_path, figures: dict | None = None) -> list:
    """runtime/probe.py's CPU measurement replaced (no kernels run) and its cache in ``tmp_path``."""
    from runtime import probe

    calls: list = []

    def fake():
        calls.append(1)
        return dict(figures or {"name": "cpu", "flops_f32": 2.5e11, "flops_bf16": 1e11, "hbm_bw": 4e10,
                                "ici_bw": 1e10, "hbm_bytes": 1 << 34, "hop_latency_s": 0.0,
                                "topology": "shared-memory", "op_overhead_s": 1.5e-6, "source": "fake probe"})

    monkeypatch.setattr(probe, "_measure", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return calls


def test_explain_says_which_probe_it_priced_with_and_reprobes_when_asked(tmp_path, monkeypatch, capsys):
    """``explain --hardware cpu`` prints the probe's provenance (when, load, key, cached or not);
    ``--reprobe`` measures again; ``--json`` carries the figures with their age."""
    import json

    from compiler.cli import main
    from conftest import ROOT

    calls = _fake_probe(monkeypatch, tmp_path)
    argv = ["explain", str(ROOT / "examples" / "tiny-gqa.model"), "--mesh", "1", "--phase", "decode",
            "--hardware", "cpu"]
    assert main(argv) == 0 and len(calls) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("hardware   1 x cpu: 0.1 TFLOP/s bf16, HBM 16 GiB at 40 GB/s, interconnect 10 GB/s "
                        "(shared-memory)")
    assert lines[2].startswith("probe      measured ") and "measured now (no cache); `--reprobe` measures again" in lines[2]
    assert lines[4] == ("cost model calibrated: bound: peak rates, no latencies (no CPU fit stored for this machine: "
                        "bench/cost_model_vs_measured.py --smollm2 fits one)")
    assert main(argv) == 0 and len(calls) == 1  # cached now
    assert f"cached in {tmp_path / 'einshard' / 'cpu-probe.json'}; `--reprobe`" in capsys.readouterr().out
    assert main(argv + ["--reprobe"]) == 0 and len(calls) == 2
    assert "measured now (asked (--reprobe))" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0 and len(calls) == 2
    hw = json.loads(capsys.readouterr().out)["hardware"]
    assert hw["probe"]["flops_f32"] == 2.5e11 and 0 <= hw["probe"]["age_s"] < 600
    assert hw["probe"]["measured_at"].endswith("Z") and "cached in" in hw["probe"]["info"]


def test_a_datasheet_chip_has_no_probe_line(capsys):
    from compiler.cli import main
    from conftest import ROOT

    assert main(["explain", str(ROOT / "examples" / "tiny-gqa.model"), "--mesh", "1", "--phase", "decode",
                 "--hardware", "a100-80g"]) == 0
    out = capsys.readouterr().out
    assert "\nprobe " not in out and "--reprobe" not in out
