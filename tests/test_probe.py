"""runtime/probe.py: the measured ``cpu`` chip, and its cache."""

from __future__ import annotations

import json

import pytest

from compiler.cost.hardware import chip_from_mapping
from runtime import probe


def test_measure_then_read_from_the_cache(tmp_path, monkeypatch):
    data = probe.measure_cpu(tmp_path)
    for k in ("flops_f32", "flops_bf16", "hbm_bw", "ici_bw", "hbm_bytes"):
        assert data[k] > 0, k
    # memory bandwidth is the faster of the copy (the interconnect of simulated devices) and a read
    assert data["hbm_bw"] >= data["ici_bw"]
    cached = json.loads((tmp_path / "cpu-probe.json").read_text())
    assert cached["version"] == probe.PROBE_VERSION
    chip = chip_from_mapping(data, "probe")
    assert chip.hbm_bw == data["hbm_bw"]

    def no_measuring():
        raise AssertionError("measured again although the cache is current")

    monkeypatch.setattr(probe, "_measure", no_measuring)
    assert probe.measure_cpu(tmp_path) == data
    # an older cache version is measured again
    (tmp_path / "cpu-probe.json").write_text(json.dumps({**data, "version": probe.PROBE_VERSION - 1}))
    with pytest.raises(AssertionError, match="measured again"):
        probe.measure_cpu(tmp_path)
