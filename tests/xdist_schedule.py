"""`pytest -n N --dist loadfile` with the most expensive work first (CI runs on 2 cores).

xdist's loadfile hands out whole files, largest test *count* first. Test counts say little here:
one SmolLM2 or pipeline-stage file costs minutes with a few dozen tests, while hundreds of
hypothesis and golden cases cost seconds. A costly file that starts last leaves the other worker
idle until it ends. This scheduler orders the work units by their estimated cost instead
(longest-processing-time-first, which keeps the two workers' end times close), and cuts the
files listed in ``SPLIT`` into one unit per test function: their costly tests share no
module-scoped fixture, so the two workers may run them side by side (the files in ``PER_TEST``:
one unit per test, e.g. one bench script per subprocess).

``COST_S`` holds estimated CPU seconds per file (or function, or test) of a cold-cache run (JAX's
persistent cache empty): per-test wall times of cold runs on the loaded 2-core machine scaled by
their CPU/wall ratio (about 1/3.5), and the tests' own notes. A file that is not listed is
priced by its number of tests.
Stale figures only cost balance, never correctness: every test still runs exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from xdist.scheduler import LoadFileScheduling

#: cold-cache CPU seconds per test file (the sum of its tests' setup + call + teardown), per
#: ``file::function`` (shared by its parametrizations) or per test (``file::function[params]``);
#: a file's figure covers its tests that no function or test entry prices
COST_S: dict[str, float] = {
    "test_partition_jax.py::test_jax_any_heads_any_mesh": 220.0,  # 60 examples, a JAX compile each
    "test_partition_jax.py::test_jax_grid_8_devices": 85.0,
    "test_partition_jax.py::test_jax_random_models_and_meshes": 70.0,
    "test_partition_jax.py": 60.0,
    "test_generate_cli.py": 330.0,  # SmolLM2: 32 tokens, chat, x=2,y=2 and x=2,y=2,z=2
    "test_multiprocess.py": 250.0,  # test_every_layout at XLA -O0 (s14)
    # bench smoke, one subprocess per script (cold run under load: 70-90 s of wall time per
    # minute of CPU); s14 shrank the smoke runs of minimal_decoder (a tiny Llama), generate (two
    # formats), gpu_generate, int8_step (one batch), cost_model_vs_measured (one batch), rewrites
    # (three rows) by their measured CPU ratios
    "test_bench_smoke.py::test_bench_script_runs[offload.py]": 69.0,
    "test_bench_smoke.py::test_bench_script_runs[gpu_generate.py]": 33.0,
    "test_bench_smoke.py::test_bench_script_runs[minimal_decoder.py]": 20.0,
    "test_bench_smoke.py::test_bench_script_runs[cost_model_vs_measured.py]": 26.0,
    "test_bench_smoke.py::test_bench_script_runs[generate.py]": 30.0,
    "test_bench_smoke.py::test_bench_script_runs[pipeline_generate.py]": 15.0,
    "test_bench_smoke.py::test_bench_script_runs[multihost.py]": 6.0,
    # CPU (user + sys) of the smoke commands, cold cache, measured alone
    "test_bench_smoke.py::test_bench_script_runs[rewrites.py]": 39.0,
    "test_bench_smoke.py::test_bench_script_runs[sharded_vs_gspmd.py]": 25.0,
    # measured alone, cold (s13): serving.py replays its trace in real time after compiling
    "test_bench_smoke.py::test_bench_script_runs[serving.py]": 35.0,
    "test_bench_smoke.py::test_bench_script_runs[int8_step.py]": 13.0,
    "test_bench_smoke.py": 45.0,
    "test_moe.py": 140.0,
    "test_stages.py::test_serving_engine_on_stages_gives_the_one_device_tokens": 40.0,
    "test_stages.py": 135.0,
    "test_generate.py": 260.0,
    "test_moe_layouts.py": 160.0,
    "test_serving_engine.py": 150.0,
    "test_partition_spmd.py": 120.0,
    "test_score.py": 120.0,
    "test_serving_http.py": 100.0,
    "test_offload.py": 90.0,
    "test_offload_serving.py": 90.0,
    "test_reference_vs_jax.py": 90.0,
    "test_pad_dims.py": 80.0,
    "test_hlo.py": 70.0,
    "test_rewrites_jax.py": 60.0,
    "test_pipeline_generate.py": 60.0,
    "test_sampling.py": 50.0,
    "test_packaging.py": 40.0,
    "test_golden.py": 40.0,
    "test_gguf.py": 30.0,
    "test_rewrites_spmd.py": 30.0,
    "test_tokenizer.py": 20.0,
    # user + sys of one cold run of the five files together (s13, shared lock, load 3-7; 105 s
    # CPU for 215 s of pytest wall), shared out by each file's wall time
    "test_out_in.py": 38.0,
    "test_cli.py": 22.0,
    "test_int8.py": 18.0,
    "test_cost_cpu.py": 16.0,
    "test_int8_dot.py": 2.0,
}

#: files whose test functions are separate work units (no module-scoped fixture between them)
SPLIT: frozenset[str] = frozenset({"test_partition_jax.py", "test_stages.py", "test_moe.py"})

#: files whose every test (each parametrization) is a work unit of its own
PER_TEST: frozenset[str] = frozenset({"test_bench_smoke.py"})

#: price of a test in a file COST_S does not list
DEFAULT_TEST_S = 0.3


def _file(nodeid: str) -> str:
    """tests/test_x.py::test_f[a] -> test_x.py"""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def _key(nodeid: str) -> str:
    """tests/test_x.py::test_f[a] -> test_x.py::test_f[a]"""
    return _file(nodeid) + "::" + nodeid.split("::", 1)[1] if "::" in nodeid else _file(nodeid)


def _function(nodeid: str) -> str:
    """tests/test_x.py::test_f[a] -> test_x.py::test_f"""
    return _key(nodeid).split("[", 1)[0]


class _CostQueue(OrderedDict):
    """xdist's work queue (scope -> {nodeid: done}) whose next unit is the costliest one left.

    The base class fills it in one go, then takes units with ``popitem(last=False)``; the order
    is settled at the first take. (Reordering the collections instead would break xdist, which
    sends workers indices into their own collection.)"""

    def popitem(self, last: bool = True) -> tuple[Any, Any]:
        if not getattr(self, "_sorted", False):
            self._sorted = True
            costs = unit_costs({scope: list(tests) for scope, tests in self.items()})
            for scope in sorted(self, key=lambda s: costs[s], reverse=True):  # stable for ties
                self.move_to_end(scope)
        return super().popitem(last=last)


class CostOrderedScheduling(LoadFileScheduling):
    """loadfile, with units taken costliest first and the ``SPLIT``/``PER_TEST`` files cut finer."""

    def __init__(self, config: Any, log: Any = None) -> None:
        super().__init__(config, log)
        self.workqueue = _CostQueue()

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        if _file(path) in PER_TEST:
            return nodeid
        if _file(path) in SPLIT:
            return nodeid.split("[", 1)[0]  # file::function (its parametrizations stay together)
        return path


def unit_costs(units: dict[str, list[str]]) -> dict[str, float]:
    """Each unit's share of the COST_S figures that price its tests."""
    def key(nodeid: str) -> str | None:
        """The most specific COST_S key that prices this test."""
        return next((k for k in (_key(nodeid), _function(nodeid), _file(nodeid)) if k in COST_S), None)

    priced_by: dict[str | None, int] = {}  # tests per key (a file's cost is shared by the rest)
    for ids in units.values():
        for nodeid in ids:
            priced_by[key(nodeid)] = priced_by.get(key(nodeid), 0) + 1
    return {scope: sum(DEFAULT_TEST_S if (k := key(n)) is None else COST_S[k] / priced_by[k] for n in ids)
            for scope, ids in units.items()}


def make_scheduler(config: Any, log: Any) -> CostOrderedScheduling | None:
    """The scheduler for `--dist loadfile`; None (xdist's own) for every other mode."""
    if config.getvalue("dist") != "loadfile":
        return None
    return CostOrderedScheduling(config, log)
