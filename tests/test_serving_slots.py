"""The slot table and the scheduling rules, without a model: Flover's move map is a permutation
that leaves every live request in the smallest window, moving as little as it can."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.sampling import SamplingParams
from runtime.serving.request import Request
from runtime.serving.scheduler import (SchedulerConfig, admitted_length, batch_bucket, choose_admissions,
                                       chunk_length, prompt_bucket)
from runtime.serving.slots import Slot, SlotTable


def req(i: int, n: int = 4) -> Request:
    return Request(str(i), (1,) * n, SamplingParams(), 4)


def table_with(groups: int, per: int, live: list[int]) -> SlotTable:
    t = SlotTable(groups * per, groups, tuple(w for w in (1, 2, 4, 8, 16) if w < per) + (per,))
    for p in live:
        t.slots[p] = Slot(req(p))
    return t


@given(st.sampled_from([(1, 8), (2, 4), (4, 4), (8, 2), (1, 16)]), st.data())
def test_compaction_is_a_permutation_into_the_smallest_window(shape, data):
    groups, per = shape
    S = groups * per
    live = data.draw(st.lists(st.integers(0, S - 1), unique=True, max_size=S))
    t = table_with(groups, per, live)
    before = {p: t.slots[p].request.id for p in live}
    width = t.width()
    perm = t.plan_compaction()
    target = t.fit(-(-len(live) // groups))
    if perm is None:
        assert target >= width
        return
    assert sorted(perm.tolist()) == list(range(S))  # one gather, nothing lost or duplicated
    after = {p: t.slots[p].request.id for p in t.live()}
    assert sorted(after.values()) == sorted(before.values())
    for p, rid in after.items():  # new slot p holds what old slot perm[p] held
        assert before[int(perm[p])] == rid
    assert t.width() == target < width
    moved = [p for p in live if perm[p] != p]
    assert all(t.row(p) >= target for p in moved)  # live slots already inside stay put


def test_moves_stay_in_their_group_when_they_can():
    t = table_with(2, 4, [3, 7])  # one request at the far end of each group
    perm = t.plan_compaction()
    assert perm is not None and t.live() == [0, 4] and perm[0] == 3 and perm[4] == 7


def test_alloc_fills_holes_before_growing_the_window_and_spreads_groups():
    t = table_with(2, 4, [0, 1])
    assert t.alloc(2) == [4, 5]  # group 1 is empty: its low rows first
    t = table_with(1, 8, [0, 2, 5])
    assert t.alloc(2) == [1, 3]
    with pytest.raises(ValueError):
        t.alloc(6)


def test_buckets_and_admission_budget():
    assert [prompt_bucket(n, 64, 8) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]
    assert prompt_bucket(100, 96, 8) == 96  # never past the context
    assert batch_bucket(3, lambda b: b % 2 == 0, 16) == 4
    assert batch_bucket(1, lambda b: b >= 8, 16) == 8
    cfg = SchedulerConfig(slots=8, step_tokens=64)
    waiting = [req(i, 10) for i in range(6)]  # bucket 16: 4 rows fit 64 tokens
    assert choose_admissions(waiting, 8, 0, 0.0, cfg, 128) == 4
    assert choose_admissions(waiting, 2, 0, 0.0, cfg, 128) == 2
    assert choose_admissions([req(0, 100)], 8, 0, 0.0, cfg, 128) == 1  # one over the budget still goes
    static = SchedulerConfig(slots=4, policy="static", static_timeout=1.0)
    assert choose_admissions(waiting[:3], 4, 0, 0.5, static, 128) == 0  # waits for a full batch
    assert choose_admissions(waiting[:3], 4, 0, 1.0, static, 128) == 3  # ... or the timeout
    assert choose_admissions(waiting, 4, 1, 9.0, static, 128) == 0  # never while a batch runs
    chunked = SchedulerConfig(chunk=16, step_tokens=64)
    # Dynamic SplitFuse: one forward = the window's decode rows + a chunk of the rest of the budget
    assert [chunk_length(w, chunked) for w in (0, 1, 4, 8)] == [16, 15, 12, 8]
    assert chunk_length(4, SchedulerConfig()) == 0
    with pytest.raises(ValueError, match="no room"):
        chunk_length(16, chunked)
    # a prompt over the budget is not prefilled at admission (its chunks ride in the forwards)
    assert [admitted_length(req(0, n), chunked) for n in (3, 16, 17)] == [3, 16, 0]
    assert choose_admissions([req(0, 100), req(1, 200)], 8, 0, 0.0, chunked, 256) == 2


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(ValueError, match="power of two"):
        SchedulerConfig(chunk=24)
    with pytest.raises(ValueError, match="window widths"):
        SlotTable(8, 2, (1, 2))
