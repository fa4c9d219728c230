"""The serving engine: every request's tokens equal its tokens generated alone (issue 10 §2),
for any arrival trace, with fusion, compaction, chunked prefill and a batch-sharded mesh; plus
the engine's admission, eviction, overload and fault rules.

The engine runs on a simulated clock (its iteration count), so the schedule is the same on every
run. The reference is runtime.generator on the same runner, one request at a time.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from compiler.build import BuildConfig, build_module
from compiler.generation import make_runner
from compiler.spec import apply_overrides, load_spec
from runtime.generator import GenerateRequest, Generator
from runtime.sampling import SamplingParams
from runtime.serving.engine import Engine
from runtime.serving.errors import OverloadedError, RequestError
from runtime.serving.kernels import Kernels
from runtime.serving.request import Request
from runtime.serving.scheduler import SchedulerConfig
from runtime.weights import random_weights

CACHE = 64


class Model:
    """A runner, its one-request-alone reference (memoized) and a simulated clock."""

    def __init__(self, mesh: str, attn: str | None = None):
        spec = apply_overrides(load_spec(EXAMPLES / "tiny-gqa.model"), mesh=mesh, attn=attn)
        fn = build_module(spec.model, BuildConfig(1, 1, 1, ("decode",), "f32")).function("decode")
        self.runner = make_runner(spec, random_weights(fn, 0), CACHE)
        self.gen = Generator(self.runner)
        self.min_batch = next(b for b in (1, 2, 4, 8) if self.runner.valid_batch(b))
        self.memo: dict[tuple, list[int]] = {}
        # compiled engine programs per slot count, shared by the engines of every trace (as one
        # server's engine reuses them): each test still starts a fresh engine (slots, queue,
        # caches); the engine refuses kernels built for another runner or slot buffer
        self.kernels: dict[int, Kernels] = {}

    def alone(self, r: Request) -> list[int]:
        key = (r.prompt, r.sampling, r.max_new_tokens, r.stop_ids)
        if key not in self.memo:
            req = GenerateRequest.of([r.prompt], r.sampling, r.max_new_tokens, r.stop_ids)
            self.memo[key] = self.gen.generate(req, stream=lambda b, t: None, batch=self.min_batch).tokens[0]
        return self.memo[key]


@pytest.fixture(scope="module")
def one_device() -> Model:
    return Model("1")


@pytest.fixture(scope="module")
def eight_devices() -> Model:
    return Model("x=2,y=2,z=2", attn="batch")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def replay(engine: Engine, clock: Clock | None, trace: list[tuple[int, Request]], max_iters: int = 500):
    """Submits each request at its iteration, steps until all are done; tokens and finish per id,
    and the iterations it took (the clock, when given, reads the iteration)."""
    tokens: dict[str, list[int]] = {r.id: [] for _, r in trace}
    finish: dict[str, str] = {}
    last = max(t for t, _ in trace)
    for it in range(max_iters):
        if clock is not None:
            clock.t = float(it)
        for t, r in trace:
            if t == it:
                engine.submit(r)
        for e in engine.step():
            if e.token is not None:
                tokens[e.request_id].append(e.token)
            if e.finish:
                finish[e.request_id] = e.finish
        if it >= last and not engine.has_work():
            return tokens, finish, it + 1
    raise AssertionError("the engine did not drain")


def request(i: int, prompt, temp=0.0, top_k=0, top_p=1.0, seed=0, max_new=8, stop=()) -> Request:
    return Request(str(i), tuple(int(t) for t in prompt), SamplingParams(temp, top_k, top_p, seed), max_new, tuple(stop))


@st.composite
def traces(draw, max_prompt: int = 24):
    n = draw(st.integers(1, 7))
    out = []
    for i in range(n):
        L = draw(st.integers(1, max_prompt))
        prompt = draw(st.lists(st.integers(0, 127), min_size=L, max_size=L))
        temp = draw(st.sampled_from([0.0, 0.0, 0.7, 1.5]))
        top_k = draw(st.sampled_from([0, 0, 5]))
        top_p = draw(st.sampled_from([1.0, 1.0, 0.8]))
        stop = draw(st.sampled_from([(), (), (3,), (37, 105)]))
        r = request(i, prompt, temp, top_k, top_p, draw(st.integers(0, 3)), draw(st.integers(1, 14)), stop)
        out.append((draw(st.integers(0, 8)), r))
    return out


def check_trace(model: Model, cfg: SchedulerConfig, trace) -> Engine:
    clock = Clock()
    engine = Engine(model.runner, cfg, clock=clock, kernels=model.kernels.get(cfg.slots))
    model.kernels.setdefault(cfg.slots, engine.kernels)
    tokens, finish, _ = replay(engine, clock, trace)
    for _, r in trace:
        want = model.alone(r)
        assert tokens[r.id] == want, (r, cfg)
        assert finish[r.id] == ("stop" if want[-1] in r.stop_ids else "length")
    assert not engine.table.live() and not engine.waiting
    return engine


configs = st.builds(SchedulerConfig, slots=st.sampled_from([2, 4]), compact=st.booleans(),
                    chunk=st.sampled_from([0, 8, 16]), step_tokens=st.sampled_from([16, 2048]),
                    policy=st.sampled_from(["fused", "fused", "static"]))


def test_one_mixed_trace_equals_generated_alone(one_device):
    """The property on one fixed trace (the hypothesis versions are slow): staggered arrivals,
    greedy and sampled rows, a stop id, prompts longer than the chunk, compaction and chunking."""
    rng = np.random.default_rng(3)
    trace = [(t, request(i, rng.integers(0, 128, n), temp, k, p, i, m, stop))
             for i, (t, n, temp, k, p, m, stop) in enumerate([
                 (0, 20, 0.0, 0, 1.0, 9, ()), (0, 3, 0.7, 5, 1.0, 12, (3,)), (1, 13, 1.5, 0, 0.8, 4, ()),
                 (2, 1, 0.0, 0, 1.0, 14, (37, 105)), (2, 24, 0.7, 0, 1.0, 6, ()), (5, 9, 0.0, 0, 1.0, 3, ())])]
    engine = check_trace(one_device, SchedulerConfig(slots=4, chunk=8, step_tokens=32), trace)
    c = engine.metrics.counters
    assert c["einshard_prefill_chunks_total"] > 0 and c["einshard_compactions_total"] > 0


class Spy:
    """The engine's kernels, logging each program call as (kind, shape)."""

    def __init__(self, kernels) -> None:
        self.k, self.log = kernels, []

    def __getattr__(self, name):
        attr = getattr(self.k, name)
        if name not in ("decode", "chunk", "mixed", "prefill", "compact"):
            return attr

        def shaped(*shape):
            fn = attr(*shape)

            def call(*args):
                self.log.append((name, shape))
                return fn(*args)
            return call
        return shaped


def test_chunked_prefill_is_one_forward_with_the_decodes(one_device):
    """Dynamic SplitFuse: a prompt over the chunk budget is not prefilled at admission; each
    iteration runs ONE model program in which the decode window (w rows) and the prompt's
    next chunk (budget - w tokens) share the token budget; the tokens equal generated alone."""
    rng = np.random.default_rng(5)
    short = request(0, rng.integers(0, 128, 3), max_new=14)
    long = request(1, rng.integers(0, 128, 27), temp=0.7, seed=2, max_new=5)
    clock = Clock()
    engine = Engine(one_device.runner, SchedulerConfig(slots=4, chunk=8), clock=clock)
    spy = engine.kernels = Spy(engine.kernels)
    tokens: dict[str, list[int]] = {"0": [], "1": []}
    per_iter = []
    for it in range(40):
        clock.t = float(it)
        engine.submit(short) if it == 0 else engine.submit(long) if it == 2 else None
        spy.log.clear()
        for e in engine.step():
            if e.token is not None:
                tokens[e.request_id].append(e.token)
        per_iter.append([c for c in spy.log if c[0] != "compact"])
        if it > 2 and not engine.has_work():
            break
    assert tokens == {"0": one_device.alone(short), "1": one_device.alone(long)}
    assert all(len([c for c in calls if c[0] != "prefill"]) <= 1 for calls in per_iter)  # one forward each
    assert ("prefill", (1, 8)) in per_iter[0] and not any(c[0] == "prefill" for c in per_iter[2])
    mixed = [c for calls in per_iter for c in calls if c[0] == "mixed"]
    # 27 prompt tokens in chunks of 8 - 2 beside a 2-row window: 5 forwards, the last re-reading 3
    assert mixed == [("mixed", (2, 1, 6))] * 5
    c = engine.metrics.counters
    assert c["einshard_fused_chunk_steps_total"] == 5 and c["einshard_prompt_tokens_total"] == 3 + 27


@pytest.mark.slow
def test_chunked_prefill_in_one_forward_on_8_devices(eight_devices):
    """The same on 16 slots sharded over 8 devices: the chunk rows are the smallest batch the
    layout takes (8, one per device), beside 1 or 2 decode rows per device."""
    rng = np.random.default_rng(7)
    trace = [(t, request(i, rng.integers(0, 128, n), temp, 0, 1.0, i, m))
             for i, (t, n, temp, m) in enumerate([(0, 4, 0.0, 12), (0, 22, 0.7, 5), (1, 17, 0.0, 6),
                                                   (3, 2, 1.5, 9), (4, 30, 0.0, 4)])]
    engine = check_trace(eight_devices, SchedulerConfig(slots=16, chunk=8), trace)
    assert engine.metrics.counters["einshard_fused_chunk_steps_total"] > 0


def test_a_chunk_budget_must_leave_room_beside_the_decode_rows(one_device):
    with pytest.raises(RequestError, match="must exceed"):
        Engine(one_device.runner, SchedulerConfig(slots=8, chunk=8))


@pytest.mark.slow
@settings(max_examples=40)
@given(trace=traces(), cfg=configs)
def test_engine_tokens_equal_generated_alone_many_traces(one_device, trace, cfg):
    check_trace(one_device, cfg, trace)


@pytest.mark.slow
@settings(max_examples=10)
@given(trace=traces(), cfg=st.builds(SchedulerConfig, slots=st.sampled_from([16]), compact=st.booleans(),
                                     chunk=st.sampled_from([0, 8]), step_tokens=st.sampled_from([32, 2048])))
def test_engine_tokens_equal_generated_alone_on_8_devices(eight_devices, trace, cfg):
    engine = check_trace(eight_devices, cfg, trace)
    assert engine.table.groups == 8  # attn=batch: the slots are sharded over every device


def test_compaction_shrinks_the_window_and_keeps_tokens(one_device):
    """Eight requests fill eight slots; the short ones end and the three long ones, scattered,
    are moved into a dense window of 4 (one gather), then 2 once only two are left."""
    lengths = [3, 30, 3, 3, 30, 3, 3, 30]
    trace = [(0, request(i, [i + 1] * 5, max_new=n)) for i, n in enumerate(lengths)]
    engine = check_trace(one_device, SchedulerConfig(slots=8), trace)
    m = engine.metrics.counters
    assert m["einshard_compactions_total"] >= 1
    # masking keeps all the holes: every step runs on the 8 rows the long requests span
    masked = check_trace(one_device, SchedulerConfig(slots=8, compact=False), trace)
    mm = masked.metrics.counters
    assert mm["einshard_compactions_total"] == 0
    assert m["einshard_decode_rows_total"] < mm["einshard_decode_rows_total"]
    assert m["einshard_decode_useful_rows_total"] == mm["einshard_decode_useful_rows_total"]


def test_a_narrow_window_writes_into_the_slot_buffer_in_place(one_device):
    """A narrow window's decode program scatters the step's new rows straight into the donated
    slot buffer (runtime/cache_windows.py): no scatter into a window-sized copy of the cache,
    which XLA had to make every step (at 4 of 8 slots it cost more than the 8-row step)."""
    import jax

    from runtime.sampling import sample
    from runtime.serving.kernels import cache_leaves

    S, w = 8, 2
    runner = one_device.runner
    kernels = Kernels(runner, S, 1, sample)
    caches = tuple(runner.empty_cache(S))
    z = (np.zeros(w, np.int32), np.ones(w, np.int32), np.zeros(w, np.float32), np.zeros(w, np.int32),
         np.ones(w, np.float32), np.zeros(w, np.uint32))
    hlo = kernels.decode(w).lower(runner.params, caches, *z).compile().as_text()
    leaves = [x for x, _ in cache_leaves(caches)]
    assert all(x.dtype == np.float32 for x in leaves)

    def scatters(shape) -> int:
        return len(re.findall(r"= f32\[" + ",".join(map(str, shape)) + r"\]\{[0-9,]*\} scatter\(", hlo))

    full = leaves[0].shape
    assert scatters(full) == len(leaves)
    assert scatters((w,) + full[1:]) == 0


def test_static_policy_waits_for_the_batch_and_runs_it_to_the_end(one_device):
    """FasterTransformer-style batching: a request arriving while a batch runs waits for all of
    it; the batch decodes at full width until its longest member ends."""
    trace = [(0, request(0, [5] * 4, max_new=2)), (0, request(1, [6] * 4, max_new=12)),
             (1, request(2, [7] * 4, max_new=2))]
    clock = Clock()
    engine = Engine(one_device.runner, SchedulerConfig(slots=2, policy="static", static_timeout=0.0), clock=clock)
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {"0": [], "1": [], "2": []}
    for it in range(40):
        if clock is not None:
            clock.t = float(it)
        for t, r in trace:
            if t == it:
                engine.submit(r)
        for e in engine.step():
            if e.token is not None:
                first.setdefault(e.request_id, it)
                tokens[e.request_id].append(e.token)
    assert first["2"] >= first["1"] + 11  # admitted only after request 1's 12 tokens
    for _, r in trace:
        assert tokens[r.id] == one_device.alone(r)


def test_prompt_plus_max_tokens_beyond_the_context_is_rejected(one_device):
    engine = Engine(one_device.runner, SchedulerConfig(slots=2))
    with pytest.raises(RequestError, match="context is 64 tokens"):
        engine.submit(request(0, [1] * 60, max_new=5))
    engine.submit(request(1, [1] * 60, max_new=4))  # exactly the context: fine
    with pytest.raises(RequestError, match="empty"):
        engine.submit(request(2, []))
    with pytest.raises(RequestError, match="token ids"):
        engine.submit(request(3, [500]))


def test_a_full_queue_refuses_and_a_waiting_request_is_never_dropped(one_device):
    clock = Clock()
    engine = Engine(one_device.runner, SchedulerConfig(slots=2, max_queue=3), clock=clock)
    for i in range(3):
        engine.submit(request(i, [i + 1] * 4, max_new=6))
    with pytest.raises(OverloadedError):
        engine.submit(request(9, [1] * 4))
    assert engine.metrics.counters["einshard_requests_rejected_total"] == 1
    engine.step()  # two admitted, one waits for a slot
    assert len(engine.waiting) == 1
    engine.submit(request(3, [9] * 4, max_new=6))
    done = {e.request_id for e in engine.run() if e.finish == "length"}
    assert done == {"0", "1", "2", "3"}


def test_abort_frees_the_slot_at_once(one_device):
    clock = Clock()
    engine = Engine(one_device.runner, SchedulerConfig(slots=1), clock=clock)
    engine.submit(request(0, [1] * 4, max_new=40))
    engine.submit(request(1, [2] * 4, max_new=3))
    engine.step()
    assert engine.table.live() and len(engine.waiting) == 1
    assert engine.abort("0")
    events = engine.step()
    assert events[0].request_id == "0" and events[0].finish == "abort"
    assert any(e.request_id == "1" and e.token is not None for e in events)  # took the freed slot
    assert not engine.abort("0")
    tokens = [e.token for e in events + engine.run() if e.request_id == "1" and e.token is not None]
    assert tokens == one_device.alone(request(1, [2] * 4, max_new=3))


class Faulty:
    """The runner, except that prefills of one length raise (a bug in one compiled program)."""

    def __init__(self, runner, bad_length: int):
        self._r, self.bad = runner, bad_length

    def __getattr__(self, name):
        return getattr(self._r, name)

    def step(self, phase, batch, length):
        if phase == "prefill" and length == self.bad:
            raise RuntimeError(f"injected fault in prefill of length {length}")
        return self._r.step(phase, batch, length)


def test_a_failing_step_fails_its_requests_not_the_engine(one_device, caplog):
    clock = Clock()
    engine = Engine(Faulty(one_device.runner, 32), SchedulerConfig(slots=4), clock=clock)
    ok = request(0, [1] * 5, max_new=6)
    engine.submit(ok)
    events = engine.step()
    engine.submit(request(1, [2] * 20, max_new=4))  # bucket 32: its prefill raises
    events += engine.run()
    bad = [e for e in events if e.request_id == "1"]
    assert len(bad) == 1 and bad[0].finish == "error" and "injected fault" in bad[0].error
    assert [e.token for e in events if e.request_id == "0"] == one_device.alone(ok)
    assert engine.metrics.counters["einshard_requests_failed_total"] == 1
    logged = [r for r in caplog.records if r.name == "einshard.serving"]  # the traceback, for the operator
    assert len(logged) == 1 and logged[0].exc_info and "injected fault" in logged[0].getMessage()
    engine.submit(request(2, [3] * 5, max_new=2))  # and the engine goes on serving
    assert [e.token for e in engine.run()] == one_device.alone(request(2, [3] * 5, max_new=2))


def test_metrics_render_as_prometheus_text(one_device):
    engine = check_trace(one_device, SchedulerConfig(slots=2), [(0, request(0, [1, 2, 3], max_new=4))])
    text = engine.metrics.render()
    assert "einshard_generated_tokens_total 4" in text
    assert 'einshard_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text
    assert "einshard_inter_token_latency_seconds_count 3" in text
    assert "# TYPE einshard_queue_depth gauge" in text
