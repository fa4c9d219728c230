"""runtime/probe.py: the measured ``cpu`` chip, and its cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from compiler.cost.hardware import chip_from_mapping
from ir.errors import CostError
from runtime import probe


def test_measure_then_read_from_the_cache(tmp_path, monkeypatch):
    data = probe.measure_cpu(tmp_path)
    for k in ("flops_f32", "flops_bf16", "hbm_bw", "ici_bw", "hbm_bytes"):
        assert data[k] > 0, k
    # memory bandwidth is the faster of the copy (the interconnect of simulated devices) and a read
    assert data["hbm_bw"] >= data["ici_bw"]
    cached = json.loads((tmp_path / "cpu-probe.json").read_text())
    assert cached["version"] == probe.PROBE_VERSION and cached["key"] == probe.machine_key()
    assert cached["figures"] == data and cached["measured"]["duration_s"] > 0
    chip = chip_from_mapping(data, "probe")
    assert chip.hbm_bw == data["hbm_bw"]

    def no_measuring():
        raise AssertionError("measured again although the cache is current")

    monkeypatch.setattr(probe, "_measure", no_measuring)
    assert probe.measure_cpu(tmp_path) == data
    # an older, unkeyed cache (version 3: the chip's fields at the top level) is measured again
    (tmp_path / "cpu-probe.json").write_text(json.dumps({**data, "version": probe.PROBE_VERSION - 1}))
    with pytest.raises(AssertionError, match="measured again"):
        probe.measure_cpu(tmp_path)


FAKE = {"name": "cpu", "flops_f32": 2.5e11, "flops_bf16": 1e11, "hbm_bw": 4e10, "ici_bw": 1e10,
        "hbm_bytes": 1 << 34, "hop_latency_s": 0.0, "topology": "shared-memory", "op_overhead_s": 1.5e-6,
        "source": "fake"}


@pytest.fixture
def counted(monkeypatch):
    """runtime/probe.py's measurement replaced by a counter returning FAKE (no JAX kernels run)."""
    calls = []

    def fake():
        calls.append(1)
        return dict(FAKE)

    monkeypatch.setattr(probe, "_measure", fake)
    return calls


def test_cache_is_keyed_by_cpu_cores_and_jax_and_expires(tmp_path, counted, monkeypatch):
    """A cache is reused only under the key it was measured under (CPU model, usable cores,
    machine, jax, jaxlib, probe version) and while younger than the maximum age; ``refresh``
    always measures. Each (re)measurement says why it happened."""
    first = probe.cpu_probe(tmp_path)
    assert first.reason == "no cache" and len(counted) == 1 and dict(first.figures) == FAKE
    again = probe.cpu_probe(tmp_path)
    assert again.reason == "cached" and len(counted) == 1 and again.measured_at == first.measured_at
    path = tmp_path / "cpu-probe.json"
    stored = json.loads(path.read_text())
    for field, other in (("jax", "0.0.1"), ("jaxlib", "0.0.1"), ("cores", 64), ("cpu", "Another CPU"),
                         ("probe", probe.PROBE_VERSION - 1)):
        path.write_text(json.dumps({**stored, "key": {**stored["key"], field: other}}))
        rec = probe.cpu_probe(tmp_path)
        assert rec.reason.startswith("key changed: ") and field in rec.reason, rec.reason
    n = len(counted)
    old = time.time() - 8 * 86400
    path.write_text(json.dumps({**stored, "measured": {**stored["measured"], "unix": old}}))
    assert probe.cpu_probe(tmp_path).reason == "older than 7.0 days (8.0 days)" and len(counted) == n + 1
    path.write_text(json.dumps({**stored, "measured": {**stored["measured"], "unix": old}}))
    monkeypatch.setenv("EINSHARD_PROBE_MAX_AGE_DAYS", "30")
    assert probe.cpu_probe(tmp_path).reason == "cached" and len(counted) == n + 1
    for bad in ("thirty", "-1", "nan", "inf"):  # refused, not silently the default
        monkeypatch.setenv("EINSHARD_PROBE_MAX_AGE_DAYS", bad)
        with pytest.raises(CostError, match="EINSHARD_PROBE_MAX_AGE_DAYS"):
            probe.cpu_probe(tmp_path)
    monkeypatch.setenv("EINSHARD_PROBE_MAX_AGE_DAYS", "30")
    assert probe.cpu_probe(tmp_path, refresh=True).reason == "asked (--reprobe)" and len(counted) == n + 2
    path.write_text("{not json")
    assert probe.cpu_probe(tmp_path).reason == "the cache is unreadable"
    assert json.loads(path.read_text())["figures"] == FAKE  # rewritten
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_record_describes_when_how_loaded_and_where():
    key = {"cpu": "Intel(R) Xeon(R) Processor", "machine": "x86_64", "cores": 2, "jax": "0.10.2",
           "jaxlib": "0.10.2", "probe": probe.PROBE_VERSION}
    t = 1_764_547_200.0  # 2025-12-01 00:00 UTC
    rec = probe.ProbeRecord(FAKE, key, t, 1.2, 1.5, 6.5, Path("/c/cpu-probe.json"))
    assert rec.describe(now=t + 5400) == (
        "measured 2025-12-01 00:00 UTC (1.5 h ago) at load 1.2 -> 1.5 on 2 cores; Intel(R) Xeon(R) Processor, "
        "jax 0.10.2, jaxlib 0.10.2; cached in /c/cpu-probe.json")
    loaded = probe.ProbeRecord(FAKE, key, t, 6.8, 7.0, 6.5, Path("/c/p.json"), "asked (--reprobe)")
    assert loaded.describe(now=t + 60) == (
        "measured 2025-12-01 00:00 UTC (1 min ago) at load 6.8 -> 7.0 on 2 cores (a loaded machine: figures low; "
        "measure again when quiet); Intel(R) Xeon(R) Processor, jax 0.10.2, jaxlib 0.10.2; measured now "
        "(asked (--reprobe))")
    # the 1-minute average lags: with only the probe running at its start, the machine was quiet
    lagging = probe.ProbeRecord(FAKE, key, t, 2.4, 2.0, 6.5, Path("/c/p.json"), running_before=1)
    assert "at load 2.4 -> 2.0 on 2 cores, 0 other processes running; Intel" in lagging.describe(now=t)
    busy = probe.ProbeRecord(FAKE, key, t, 2.4, 2.6, 6.5, Path("/c/p.json"), running_before=4)
    assert "3 other processes running (a loaded machine: figures low" in busy.describe(now=t)
    j = rec.to_json(now=t + 3 * 86400)
    assert j["measured_at"] == "2025-12-01T00:00:00Z" and j["age_s"] == 3 * 86400 and j["key"] == key


def test_stale_reason_of_a_legacy_cache():
    key = probe.machine_key()
    assert probe.stale_reason({**FAKE, "version": 3}, key, time.time(), 1e9) == "the cache predates keyed probes"
    fresh = {"key": key, "figures": FAKE, "measured": {"unix": time.time()}}
    assert probe.stale_reason(fresh, key, time.time(), 1e9) is None


def test_read_bandwidth_reads_as_much_as_the_step_up_to_the_cap():
    """The roofline's rate comes from an array as large as the step reads (a small one sits in
    the CPU's cache and reads faster), never larger than the cap (no second copy of a model)."""
    assert probe.read_buffer_bytes(538_000_000) == 538_000_000
    assert probe.read_buffer_bytes(10 << 30) == probe.READ_CAP_BYTES
    assert probe.read_buffer_bytes(10) == 1 << 20
    assert probe.read_buffer_bytes(3 << 20 | 3) % 4 == 0
    rate = probe.read_bandwidth(8 << 20, repeats=3)
    assert 1e8 < rate < 1e13
