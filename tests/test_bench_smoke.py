"""The benchmark scripts run to the end on small shapes (they are not imported anywhere else, so
a refactor can break one silently: ``bench/sharded_vs_gspmd.py`` once did). Nothing is timed
here (the scripts compile at XLA's backend optimization level 0: their figures mean nothing in
this test); each script prints its ratios against a baseline measured in the same run, and this
only checks that the table and its ratio column are there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SMALL = {
    "compile_time.py": ["--repeats", "1"],
    # two of the ten layouts run every line of the per-layout loop (a weight-stationary and a
    # weight-gathered one, both attention kinds); tests/test_partition_jax.py checks all ten
    "sharded_vs_gspmd.py": ["--repeats", "1", "--d-model", "64", "--d-ff", "128", "--prompt", "8", "--cache", "16",
                            "--layouts", "2d-ws/batch", "wg-xyz/heads"],
    # three of the seven rows run every line: the baseline, a row without rewrites (bf16) and one
    # with all of them (tests/test_rewrites_jax.py checks each rewrite under JAX)
    "rewrites.py": ["--repeats", "1", "--d-model", "64", "--d-ff", "128", "--prompt", "8", "--cache", "16",
                    "--layers", "1", "--configs", "baseline", "bf16, no rewrites", "all"],
    # one batch: the other two are more turns of the same loop
    "cost_model_vs_measured.py": ["--repeats", "1", "--batches", "1"],
    "serving.py": ["--small", "--schedulers", "static", "fused-compact", "--traces", "poisson",
                   "--loads", "near-saturation"],
    "calibrate.py": ["--max-evals", "2", "--fix", "link=1"],
    # f32 (the minimal decoder's rows) and int8 (the int8/f32 ratio): bf16 takes int8's lines
    "generate.py": ["--tiny", "--repeats", "1", "--steps", "4", "--prompt", "8", "--prefill", "16", "--batches", "2",
                    "--weights", "f32,int8"],
    "int8_step.py": ["--tiny", "--steps", "2", "--formats", "f32,int8,int8w", "--batches", "1"],
    "offload.py": ["--tiny", "--batches", "2", "--new", "3", "--rounds", "1"],
    "multihost.py": ["--repeats", "1", "--sizes-kib", "64"],
    "gpu_generate.py": ["--tiny", "--batches", "1"],
    # a tiny Llama with SmolLM2's tied head: the same code as SmolLM2, without its 30 layers
    "minimal_decoder.py": ["--tiny", "--prompt", "8", "--steps", "4", "--repeats", "1"],
    "pipeline_generate.py": ["--mesh", "stage=2,x=2", "--batch", "4", "--prompt", "4", "--new", "4", "--rounds", "1"],
    "sliced_reads.py": ["examples/tiny-mqa.model", "--mesh", "x=2", "-n", "2"],  # 2 processes, ~6 s
}


def test_every_bench_script_is_covered():
    assert {p.name for p in (ROOT / "bench").glob("[!_]*.py")} == set(SMALL)  # _harness.py is shared code


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL))
def test_bench_script_runs(script, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # the CPU probe measures into a fresh cache
    # each script sets up its own devices; the programs compile at XLA's backend optimization
    # level 0 (the same programs, less optimized machine code): nothing here is timed, and
    # compiling was most of these runs' time (CPU of the 14 smoke runs, cold: 258 -> 213 s)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *SMALL[script]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio" in r.stdout, r.stdout[-3000:]
