"""`pytest -n N --dist loadfile` with the most expensive work first (CI runs on 2 cores).

xdist's loadfile hands out whole files, largest test *count* first. Test counts say little here:
one SmolLM2 or pipeline-stage file costs minutes with a few dozen tests, while hundreds of
hypothesis and golden cases cost seconds. A costly file that starts last leaves the other worker
idle until it ends. This scheduler orders the work units by their measured cost instead
(longest-processing-time-first, which keeps the two workers' end times close), and cuts the
files listed in ``SPLIT`` into one unit per test function: their costly tests share no
module-scoped fixture, so the two workers may run them side by side (the files in ``PER_TEST``:
one unit per test, e.g. one bench script per subprocess).

``COST_S`` holds seconds per file from `--durations=0` of a cold-cache run (JAX's persistent
cache empty) on the 2-core machine; a file that is not listed is priced by its number of tests.
Stale figures only cost balance, never correctness: every test still runs exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from xdist.scheduler import LoadFileScheduling

#: cold-cache seconds per test file (the sum of its tests' setup + call + teardown), per
#: ``file::function`` (shared by its parametrizations) or per test (``file::function[params]``)
COST_S: dict[str, float] = {}

#: files whose test functions are separate work units (no module-scoped fixture between them)
SPLIT: frozenset[str] = frozenset()

#: files whose every test (each parametrization) is a work unit of its own
PER_TEST: frozenset[str] = frozenset()

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


class CostOrderedScheduling(LoadFileScheduling):
    """loadfile, with units ordered by cost (largest first) and the ``SPLIT`` files cut by function."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        if _file(path) in PER_TEST:
            return nodeid
        if _file(path) in SPLIT:
            return nodeid.split("[", 1)[0]  # file::function (its parametrizations stay together)
        return path

    def schedule(self) -> None:
        if self.collection is None and self.collection_is_completed:
            self.config.option.loadscopereorder = False  # the base class keeps our order
            for node, ids in list(self.registered_collections.items()):
                self.registered_collections[node] = self._ordered(ids)
        super().schedule()

    def _ordered(self, ids: list[str]) -> list[str]:
        units: OrderedDict[str, list[str]] = OrderedDict()
        for nodeid in ids:
            units.setdefault(self._split_scope(nodeid), []).append(nodeid)
        tests: dict[str, int] = {}  # tests per file and per file::function
        for nodeid in ids:
            for key in {_file(nodeid), _function(nodeid)}:
                tests[key] = tests.get(key, 0) + 1

        def cost(scope: str) -> float:
            """The unit's listed cost, else its share of its function's or its file's cost."""
            total = 0.0
            for nodeid in units[scope]:
                key = next((k for k in (_key(nodeid), _function(nodeid), _file(nodeid)) if k in COST_S), None)
                total += DEFAULT_TEST_S if key is None else COST_S[key] / tests.get(key, 1)
            return total

        order = sorted(units, key=cost, reverse=True)  # stable: ties keep collection order
        return [nodeid for scope in order for nodeid in units[scope]]


def make_scheduler(config: Any, log: Any) -> CostOrderedScheduling | None:
    """The scheduler for `--dist loadfile`; None (xdist's own) for every other mode."""
    if config.getvalue("dist") != "loadfile":
        return None
    return CostOrderedScheduling(config, log)
