"""``auto`` against the paper's published layout choices (Pope et al. 2022, §3.3, §4, Tables 2-3,
as summarised in reference/partitioning.md §6.3 "When to use which"), for PaLM on TPU v4 slices:

* decode, low and high batch: 2D weight-stationary FFN, multiquery attention sharded over batch;
* prefill at batch 1 (low latency): 2D weight-stationary, attention sharded over heads;
* prefill at high batch: weight-gathered XYZ, attention sharded over batch;
* past §5.2's threshold (n > 4F/E = 16 chips), 2D weight-stationary also for PaLM 8B. (At 8
  chips the paper's closed forms favour 1D, 2BLE < 3BLE, but with App. A.1's (K-1)/K kept, as the
  model does, the two tie at 1.75 BLE: 2-chip collectives move only half their bytes. So no
  8-chip decode choice is asserted.)

The choices are made under the paper's own implementation, looped collective einsums
(``overlap = looped``), with the default (calibrated) model and with the bound. The eight rows
of ../shared/reference/paper-calibration.csv are asserted one by one; the calibration was fitted
to their times with the published layouts, not to the choices. Model shapes come from the
example specs (reference §3).
"""

from __future__ import annotations

import csv
import math

import pytest

from compiler.cost.autolayout import evaluate, resolve_auto
from compiler.cost.hardware import CHIPS
from compiler.spec import apply_overrides, load_spec
from conftest import EXAMPLES, ROOT

V4 = CHIPS["tpu-v4"]
M64 = "x=4,y=4,z=4"

CASES = [
    # model, mesh, phase, batch, (ffn, attn)
    ("palm-540b", M64, "decode", 64, ("2d-ws", "batch")),
    ("palm-540b", M64, "decode", 512, ("2d-ws", "batch")),
    ("palm-540b", M64, "prefill", 1, ("2d-ws", "heads")),
    ("palm-540b", M64, "prefill", 128, ("wg-xyz", "batch")),
    ("palm-62b", M64, "decode", 64, ("2d-ws", "batch")),
    ("palm-62b", M64, "decode", 512, ("2d-ws", "batch")),
    ("palm-62b", M64, "prefill", 1, ("2d-ws", "heads")),
    ("palm-62b", M64, "prefill", 512, ("wg-xyz", "batch")),
    ("palm-62b", "x=2,y=4,z=4", "decode", 64, ("2d-ws", "batch")),
    ("palm-62b", "x=2,y=4,z=4", "prefill", 512, ("wg-xyz", "batch")),
    ("palm-8b", "x=2,y=2,z=2", "prefill", 128, ("wg-xyz", "batch")),
    ("palm-8b", M64, "decode", 64, ("2d-ws", "batch")),
    ("palm-8b", M64, "prefill", 1, ("2d-ws", "heads")),
]


CALIBRATION = ROOT / "compiler" / "cost" / "paper-calibration.csv"  # a copy of ../shared/reference's
ROWS = list(csv.DictReader(open(CALIBRATION)))


@pytest.mark.parametrize("cost_model", ["calibrated", "bound"])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['model']}-{r['chips']}-{r['phase']}-{r['batch']}-{r['weights']}")
def test_auto_reproduces_the_published_layout_of_every_calibration_row(row, cost_model):
    spec = apply_overrides(load_spec(EXAMPLES / f"{row['model']}.model"), mesh=row["mesh"].replace(";", ","),
                           phase=row["phase"], batch=row["batch"], seq=row["context_tokens"], ffn="auto", attn="auto",
                           weights=row["weights"], overlap="looped")
    resolved, choice = resolve_auto(spec, V4, cost_model)
    assert (resolved.serve.ffn, resolved.serve.attn) == (row["ffn"], row["attn"]), "\n".join(choice.report(limit=10))


def test_calibration_rows_are_there():
    assert len(ROWS) == 8, f"expected the 8 rows of {CALIBRATION}"


@pytest.mark.parametrize("model,mesh,phase,batch,want", CASES)
def test_auto_reproduces_the_paper_choice(model, mesh, phase, batch, want):
    spec = apply_overrides(load_spec(EXAMPLES / f"{model}.model"), mesh=mesh, phase=phase, batch=batch, seq=2048,
                           ffn="auto", attn="auto", weights="bf16", overlap="looped")
    resolved, choice = resolve_auto(spec, V4, "bound")
    assert (resolved.serve.ffn, resolved.serve.attn) == want, "\n".join(choice.report(limit=10))
    e = choice.chosen.estimate
    # lower bounds: no faster than the roofline of its own matmuls and weight loads
    assert e.step_time_s >= max(e.per_step.compute, e.per_step.weights)
    assert e.fits and 0 < e.mfu < 1


@pytest.mark.parametrize("overlap", ["none", "looped", "bidirectional"])
@pytest.mark.parametrize("cost_model", ["calibrated", "bound"])
def test_palm_540b_decode_ranks_2d_above_1d_and_heads(overlap, cost_model):
    """§3.3: batch-sharded multiquery loads 1/n of the KV cache per chip, head-sharded all of it;
    and 2D-WS stays ahead of 1D-WS with the collectives looped, as the paper measured."""
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), phase="decode", batch=64, seq=2048,
                           overlap=overlap)
    ch = evaluate(spec, V4, ("1d-ws", "2d-ws"), ("heads", "batch"), model=cost_model)
    est = {(c.ffn, c.attn): c.estimate for c in ch.candidates}
    assert est["2d-ws", "batch"].per_step.kv * 64 == pytest.approx(est["2d-ws", "heads"].per_step.kv, rel=0.01)
    assert est["2d-ws", "batch"].step_time_s < est["1d-ws", "batch"].step_time_s
    assert est["2d-ws", "batch"].step_time_s < est["2d-ws", "heads"].step_time_s


def test_nothing_fits_is_a_cost_error():
    from dataclasses import replace

    from ir.errors import CostError

    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), mesh="x=2,y=2,z=2", ffn="auto", attn="auto")
    with pytest.raises(CostError, match=r"no candidate layout fits in tpu-v4's HBM \(32 GiB per chip\)"):
        resolve_auto(spec, replace(V4, name="tpu-v4"))


# ---- Fig. 3: the FFN layouts' crossovers in tokens per batch ------------------------------------


def _fig3_best(tokens: int) -> str:
    """explain's choice of FFN layout (attention batch-sharded, overlap = none, the bound) for the
    Fig. 3 configuration: X = Y = Z = 4, E = 16384, F = 65536, a 2-matrix gelu FFN, bf16. The
    attention is made as small as the layouts allow (32 heads of 2 in a parallel block, so its
    projections join the FFN's collectives; measured with 16 heads the crossovers move by 6-25%,
    with 64 by 1.6%) and the layers many, so the step is the FFN's."""
    from dataclasses import replace as _replace

    from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec

    model = ModelSpec("fig3", layers=1000, d_model=16384, heads=32, kv_heads=32, d_head=2, d_ff=65536, vocab=256,
                      block="parallel", mlp="gelu", norm="layernorm", bias="none")
    spec = Spec(model, MeshSpec((("x", 4), ("y", 4), ("z", 4))),
                ServeSpec(phase="prefill", batch=64, seq=tokens // 64, ffn="auto", attn="batch", weights="bf16",
                          overlap="none", hardware="tpu-v4"))
    ch = evaluate(spec, _replace(V4, hbm_bytes=1 << 50), model="bound")  # the ranking, memory aside
    return min((c for c in ch.candidates if c.legal), key=lambda c: c.estimate.step_time_s).ffn


@pytest.mark.parametrize("before,after,tokens", [("2d-ws", "wg-x", 16384), ("wg-x", "wg-xy", 65536),
                                                 ("wg-xy", "wg-xyz", 786432)])
def test_fig3_crossovers_from_explains_ranking(before, after, tokens):
    """The ledger's per-chip volumes cross at 16,384 / 65,536 / 786,432 tokens (reference §5.4);
    with nothing overlapped the ranking crosses there too: the issue's goal is within 1%.
    Measured (linear interpolation of the step times): 16,457 (+0.44%), 64,989 (-0.83%), 785,944
    (-0.06%); what is left is the attention's own collectives (T x 64 elements), which the FFN
    volumes of Fig. 3 leave out. Asserted: the choice flips inside [-1%, +1%] of each."""
    lo = math.ceil(tokens * 0.99 / 64) * 64  # whole multiples of the batch (64), inside +-1%
    hi = math.floor(tokens * 1.01 / 64) * 64
    assert (_fig3_best(lo), _fig3_best(hi)) == (before, after)


@pytest.mark.parametrize("tokens_factor,want", [(0.9, "2d-ws"), (1.1, "wg-xyz")])
def test_palm_540b_prefill_switches_from_2d_to_wg_xyz_near_the_papers_147456_tokens(tokens_factor, want):
    """§3.2.3's analysis for PaLM 540B on 4x4x4: 2D-WS moves 2BL(E/X + F/YZ) per chip per layer,
    XYZ weight-gathered 2EF; they cross at BL = EF / (E/X + F/YZ) = 147,456 tokens. With nothing
    overlapped the model's ranking of the two crosses at 158k (batch 64, the prompt varied):
    asserted at -10% and +10% of 147,456. (WG-X and WG-XY, outside that analysis, cross 2D-WS
    much earlier by the same volumes: at BL = E = 18,432, as in Fig. 3.)"""
    seq = round(147456 * tokens_factor / 64)
    spec = apply_overrides(load_spec(EXAMPLES / "palm-540b.model"), phase="prefill", batch=64, seq=seq, ffn="auto",
                           attn="auto", weights="bf16", overlap="none")
    from dataclasses import replace as _replace

    ch = evaluate(spec, _replace(V4, hbm_bytes=1 << 50), ("2d-ws", "wg-xyz"), model="bound")
    assert min((c for c in ch.candidates if c.legal), key=lambda c: c.estimate.step_time_s).ffn == want


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['model']}-{r['chips']}-{r['phase']}-{r['batch']}-{r['weights']}")
def test_bound_stays_below_and_calibrated_near_every_measured_row(row):
    """The published layout priced as the paper ran it (looped): ``bound`` never exceeds the
    measurement (its guarantee); ``calibrated`` is within +-25% (the fit's residuals are 0.75-1.15;
    held out one row at a time, 7 of 8 stay within +-25%, 0.705-1.225: bench/calibrate.py
    --leave-one-out)."""
    spec = apply_overrides(load_spec(EXAMPLES / f"{row['model']}.model"), mesh=row["mesh"].replace(";", ","),
                           phase=row["phase"], batch=row["batch"], seq=row["context_tokens"], ffn=row["ffn"],
                           attn=row["attn"], weights=row["weights"], overlap="looped")
    steps = int(row["generated_tokens"]) if row["phase"] == "decode" else 1
    measured = float(row["measured_total_s"])
    t = {m: evaluate(spec, V4, model=m).candidates[0].estimate.step_time_s * steps for m in ("bound", "calibrated")}
    assert t["bound"] <= measured
    assert 0.75 <= t["calibrated"] / measured <= 1.25
    assert t["bound"] < t["calibrated"]
