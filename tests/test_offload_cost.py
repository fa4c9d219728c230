"""``explain --offload`` (issue 15 §3): the streamed step is max(compute, transfer) per layer plus
the exposed first layer; streaming approaches resident throughput as the batch grows; the link
bandwidths come from the chip (file) or the table; the CLI reports the batch for a target."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from compiler.cli import main
from compiler.cost.hardware import CHIPS, chip_from_mapping
from compiler.cost.offload import CPU_EXPOSED, LINKS, batch_for_fraction, estimate_offload, link_bandwidth
from compiler.exit_codes import EXIT_OK
from compiler.spec import load_spec
from conftest import ROOT
from ir.errors import CostError

SPEC = ROOT / "examples" / "tiny-gqa.model"


def _spec(batch: int = 1):
    s = load_spec(str(SPEC))
    return replace(s, mesh=replace(s.mesh, axes=()), serve=replace(s.serve, batch=batch, ffn="1d-ws", attn="heads"))


def test_step_is_max_of_compute_and_transfer_plus_the_first_layer() -> None:
    chip = CHIPS["a100-80g"]
    e = estimate_offload(_spec(), chip, "host", 1)
    c, t, o, n = e.compute_s, e.transfer_s, e.other_s, e.layers
    assert e.link_bw == LINKS["a100-80g"][0] and t == pytest.approx(e.layer_bytes / e.link_bw)
    assert e.offload_step_s == pytest.approx(t + (n - 1) * max(c, t) + c + o)
    assert e.no_prefetch_step_s == pytest.approx(n * (c + t) + o) and e.no_prefetch_step_s >= e.offload_step_s
    assert e.resident_step_s == pytest.approx(n * c + o)
    assert e.layer_bytes > 0 and 0 < e.fraction <= 1


def test_fraction_grows_with_batch_and_the_target_batch_is_the_first_to_reach_it() -> None:
    chip = replace(CHIPS["a100-80g"], host_bw=2e9)  # a slow link, so small batches are transfer-bound
    at, swept = batch_for_fraction(_spec(), chip, "host", 0.5, max_batch=1 << 14)
    fr = [s.fraction for s in swept]
    assert fr == sorted(fr) and fr[0] < 0.5
    assert at is not None and swept[-1].batch == at and swept[-1].fraction >= 0.5 > swept[-2].fraction


def test_link_bandwidths_from_chip_file_table_or_error() -> None:
    d = {"name": "mine", "flops_bf16": 1e14, "hbm_bytes": 1 << 34, "hbm_bw": 1e12, "ici_bw": 1e11}
    assert link_bandwidth(chip_from_mapping({**d, "disk_bw": 3e9}, "f"), "disk")[0] == 3e9
    assert link_bandwidth(CHIPS["h200"], "host")[0] == LINKS["h200"][0]
    with pytest.raises(CostError, match="host_bw"):
        link_bandwidth(chip_from_mapping(d, "f"), "host")


def test_cli_explain_offload(capsys) -> None:
    argv = ["explain", str(SPEC), "--mesh", "1", "--ffn", "1d-ws", "--attn", "heads", "--hardware", "a100-80g",
            "--offload", "host", "--batch", "4"]
    assert main(argv + ["--json"]) == EXIT_OK
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "host" and r["batch"] == 4 and r["resident_fits"]
    assert r["batch_for_target"] is None or r["sweep"][str(r["batch_for_target"])] >= 0.9
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "offloading is not needed" in out and "per layer" in out


def test_io_probe_measures_and_caches(tmp_path) -> None:
    from runtime.probe import measure_io

    io = measure_io(tmp_path)
    assert all(io[k] > 0 for k in ("memcpy_bw", "disk_bw", "page_cache_bw"))
    assert not list(tmp_path.glob("*.bin"))  # the scratch file is gone
    assert measure_io(tmp_path) == io  # the second call reads the cache


IO = {"memcpy_bw": 3.2e9, "disk_bw": 1.3e9, "page_cache_bw": 3.0e9, "direct_bw": 1.6e9, "direct": True,
      "source": "fake io probe"}
CPU = chip_from_mapping({"name": "cpu", "flops_f32": 2.5e11, "flops_bf16": 1e11, "hbm_bw": 4e10, "ici_bw": 1e10,
                         "hbm_bytes": 1 << 34, "topology": "shared-memory", "op_overhead_s": 1.5e-6}, "test")


@pytest.fixture
def fake_io(tmp_path, monkeypatch):
    from runtime import probe

    monkeypatch.setattr(probe, "_measure_io", lambda scratch: dict(IO))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_o_direct_reads_are_priced_at_the_direct_rate_and_warm_equals_cold(fake_io) -> None:
    """The pool reads with O_DIRECT: the page cache plays no part, so a warm store is read from
    the disk as a cold one is, at the probe's O_DIRECT rate, beside the compute (overlapped).
    Buffered reads (the fallback, ``direct=False``) keep the buffered rates, and from the page
    cache they are a kernel memcpy on the compute's cores: not overlapped."""
    cold, warm = (link_bandwidth(CPU, "disk", c) for c in ("cold", "warm"))
    assert cold[0] == warm[0] == IO["direct_bw"] and "O_DIRECT" in cold[1]
    assert link_bandwidth(CPU, "disk", "cold", direct=False)[0] == IO["disk_bw"]
    assert link_bandwidth(CPU, "disk", "warm", direct=False)[0] == IO["page_cache_bw"]
    assert link_bandwidth(CPU, "host")[0] == IO["memcpy_bw"]
    # a rate given with the chip (bench/offload.py: the store's rate sampled in its run) wins for O_DIRECT
    assert link_bandwidth(replace(CPU, disk_bw=2.0e9), "disk", "warm") == (2.0e9, "the chip's disk_bw (O_DIRECT)")
    assert link_bandwidth(replace(CPU, disk_bw=2.0e9), "disk", "warm", direct=False)[0] == IO["page_cache_bw"]
    with pytest.raises(CostError, match="page-cache state"):
        link_bandwidth(CPU, "disk", "hot")
    s = _spec(8)
    ec, ew = (estimate_offload(s, CPU, "disk", 8, cache=c) for c in ("cold", "warm"))
    assert ec.overlaps and ew.overlaps and ec.direct and ew.offload_step_s == pytest.approx(ec.offload_step_s)
    c, t, o, n = ew.compute_s, ew.transfer_s, ew.other_s, ew.layers
    assert t == pytest.approx(ew.layer_bytes / IO["direct_bw"])
    # on the cpu chip the overlap is partial: each layer also pays CPU_EXPOSED x the shorter one
    assert ew.offload_step_s == pytest.approx(t + (n - 1) * (max(c, t) + CPU_EXPOSED * min(c, t)) + c + o)
    assert 0 < CPU_EXPOSED < 1
    assert ew.no_prefetch_step_s == pytest.approx(n * (c + t) + o) and ew.no_prefetch_step_s > ew.offload_step_s
    bw = estimate_offload(s, CPU, "disk", 8, cache="warm", direct=False)
    assert not bw.overlaps and not bw.direct and bw.offload_step_s == pytest.approx(bw.no_prefetch_step_s)
    assert bw.transfer_s == pytest.approx(bw.layer_bytes / IO["page_cache_bw"])
    bc = estimate_offload(s, CPU, "disk", 8, cache="cold", direct=False)
    assert bc.overlaps and bc.transfer_s == pytest.approx(bc.layer_bytes / IO["disk_bw"])
    assert not estimate_offload(s, CPU, "host", 8).overlaps


def test_io_probe_records_the_o_direct_rate(tmp_path) -> None:
    from runtime.probe import io_probe

    rec = io_probe(tmp_path)
    assert rec.figures["direct_bw"] > 0 and rec.key["device"] == __import__("os").stat(tmp_path).st_dev
    assert io_probe(tmp_path).reason == "cached"


def test_cli_reprobe_with_offload_measures_the_disk_again(fake_io, monkeypatch, capsys) -> None:
    from runtime import probe

    ios: list = []
    monkeypatch.setattr(probe, "_measure_io", lambda scratch: ios.append(1) or dict(IO))
    monkeypatch.setattr(probe, "_measure", lambda: {"name": "cpu", "flops_f32": 2.5e11, "flops_bf16": 1e11,
                                                    "hbm_bw": 4e10, "ici_bw": 1e10, "hbm_bytes": 1 << 34,
                                                    "topology": "shared-memory", "op_overhead_s": 1.5e-6})
    argv = ["explain", str(SPEC), "--mesh", "1", "--ffn", "1d-ws", "--attn", "heads", "--hardware", "cpu",
            "--offload", "disk", "--batch", "4"]
    assert main(argv) == EXIT_OK and len(ios) == 1
    assert main(argv) == EXIT_OK and len(ios) == 1  # cached
    assert main(argv + ["--reprobe"]) == EXIT_OK and len(ios) == 2
    assert "over 1.60 GB/s (O_DIRECT read rate" in capsys.readouterr().out
