"""The serving engine: one iteration at a time, Flover's temporal fusion over a slot buffer.

An iteration (``step``) admits waiting requests into free slots (one batched, bucketed prefill
whose rows are scattered into the slot buffer on device), continues chunked prompts, compacts
the live slots into a smaller window when that shrinks it, and runs one compiled decode step
over the window, every slot at its own position. A request leaves its slot the moment it
stops. The engine never reads a clock except the one it is given, so tests drive it by
iterations and get the same schedule every time; the HTTP server runs it on a thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Sequence

import jax
import numpy as np

from runtime.serving.errors import OverloadedError, RequestError, ServingError
from runtime.serving.kernels import Caches, Kernels, cache_leaves
from runtime.serving.metrics import Metrics
from runtime.serving.request import Event, Request
from runtime.serving.scheduler import (SchedulerConfig, admitted_length, batch_bucket, choose_admissions,
                                       chunk_length, pow2_at_least, prompt_bucket)
from runtime.serving.slots import Slot, SlotTable

#: a failed step's traceback goes here (its clients get only the one-line message); with no
#: logging configured, Python prints it to stderr
_LOG = logging.getLogger("einshard.serving")


def batch_groups(caches: Caches) -> int:
    """How many shards the layout splits the caches' batch dim into."""
    c, axis = cache_leaves(caches)[0]
    return c.shape[axis] // c.sharding.shard_shape(c.shape)[axis]


def _widths(per: int, groups: int, valid: Callable[[int], bool]) -> tuple[int, ...]:
    ws = {per, *(1 << i for i in range(per.bit_length()) if (1 << i) <= per)}
    return tuple(w for w in sorted(ws) if valid(w * groups))


class Engine:
    """Fused decoding of many requests over ``config.slots`` preallocated KV slots.

    ``submit`` queues a request (or raises ``RequestError`` / ``OverloadedError``), ``abort``
    drops one, ``step`` runs one iteration and returns its events."""

    def __init__(self, runner: Any, config: SchedulerConfig, *, clock: Callable[[], float] = time.monotonic,
                 sample: Callable[..., jax.Array] | None = None,
                 pad_token: int = 0, kernels: Kernels | None = None):
        if sample is None:
            from runtime.sampling import sample as default_sample
            sample = default_sample
        self.runner, self.cfg, self.clock = runner, config, clock
        self.pad_token = pad_token
        self.T = runner.cache_len
        S = config.slots
        if not runner.valid_batch(S):
            runner.empty_cache(S)  # raises the layout's own reason
            raise RequestError(f"{S} slots cannot be sharded by this layout", param="slots",
                               hint="use a multiple of the devices the layout shards the batch over")
        self.caches = tuple(runner.empty_cache(S))
        groups = batch_groups(self.caches)
        widths = _widths(S // groups, groups, runner.valid_batch)
        self.table = SlotTable(S, groups, widths)
        if config.chunk and config.chunk <= self.table.per:
            raise RequestError(f"a chunk budget of {config.chunk} tokens must exceed the {self.table.per} slots "
                               "per device (the decode rows share it)", param="chunk")
        if kernels is not None and (kernels.runner is not runner or kernels.slots != S or kernels.groups != groups):
            raise ValueError("kernels were built for another runner or slot buffer")
        self.kernels = kernels or Kernels(runner, S, groups, sample)  # shared: compiled programs are reused
        self.waiting: deque[Request] = deque()
        self.arrival: dict[str, float] = {}
        self.last_emit: dict[str, float] = {}
        self.pending: list[Event] = []
        self.static_width = 0
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Fresh counters (after a warm-up run, say), the buffer's gauges set."""
        self.metrics = Metrics()
        self.metrics.set("einshard_slots", self.cfg.slots)
        self.metrics.set("einshard_kv_cache_bytes", sum(c.nbytes for c, _ in cache_leaves(self.caches)))

    # ---- requests in and out -------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raises ``RequestError`` for a request that can never run here."""
        n = len(req.prompt)
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if req.max_new_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {req.max_new_tokens}", param="max_tokens")
        if n + req.max_new_tokens > self.T:
            raise RequestError(
                f"this model's context is {self.T} tokens, but the prompt ({n} tokens) plus max_tokens "
                f"({req.max_new_tokens}) needs {n + req.max_new_tokens}", param="max_tokens",
                hint="shorten the prompt or lower max_tokens")
        if any(not 0 <= t < self.runner.vocab for t in req.prompt):
            raise RequestError(f"prompt token ids must be in [0, {self.runner.vocab})", param="prompt")

    def submit(self, req: Request, arrival: float | None = None) -> None:
        """Queues ``req`` (FIFO); ``arrival`` (clock time) defaults to now, for latency metrics."""
        try:
            self.check(req)
            if len(self.waiting) >= self.cfg.max_queue:
                raise OverloadedError(f"the queue is full ({self.cfg.max_queue} requests waiting)",
                                      hint="retry later")
        except ServingError:
            self.metrics.inc("einshard_requests_rejected_total")
            raise
        self.waiting.append(req)
        self.arrival[req.id] = self.clock() if arrival is None else arrival
        self.metrics.inc("einshard_requests_total")

    def abort(self, request_id: str) -> bool:
        """Drops a waiting or running request (its slot is free at once); an ``abort`` event
        follows in the next ``step``. False when it is unknown or already finished."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                break
        else:
            p = self.table.find(request_id)
            if p is None:
                return False
            self.table.slots[p] = None
        self._forget(request_id)
        self.metrics.inc("einshard_requests_aborted_total")
        self.pending.append(Event(request_id, finish="abort"))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.table.live() or self.pending)

    def _forget(self, rid: str) -> None:
        self.arrival.pop(rid, None)
        self.last_emit.pop(rid, None)

    # ---- one iteration ------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One iteration: admit, compact, one fused forward; the events it produced (and any
        left pending by abort since the last one first), in order."""
        events, self.pending = self.pending, []
        self._admit(events)
        if self.cfg.compact and self.cfg.policy == "fused":
            self._compact(events)
        self._decode(events)
        live = self.table.live()
        if not live:
            self.static_width = 0
        m = self.metrics
        m.inc("einshard_iterations_total")
        m.set("einshard_queue_depth", len(self.waiting))
        m.set("einshard_active_slots", len(live))
        return events

    def run(self, max_steps: int = 1_000_000) -> list[Event]:
        """Steps until nothing is left (tests and offline use)."""
        out: list[Event] = []
        for _ in range(max_steps):
            if not self.has_work():
                return out
            out += self.step()
        raise RuntimeError(f"engine still busy after {max_steps} steps")

    def _emit(self, p: int, token: int, events: list[Event]) -> None:
        s = self.table.slots[p]
        assert s is not None
        rid, now = s.request.id, self.clock()
        s.generated += 1
        s.last_token = token
        m = self.metrics
        m.inc("einshard_generated_tokens_total")
        if rid in self.last_emit:
            m.itl.observe(now - self.last_emit[rid])
        else:
            m.ttft.observe(now - self.arrival.get(rid, now))
        self.last_emit[rid] = now
        finish = ("stop" if token in s.request.stop_ids else
                  "length" if s.generated >= s.request.max_new_tokens else None)
        events.append(Event(rid, token, finish))
        if finish:
            m.e2e.observe(now - self.arrival.get(rid, now))
            self.table.slots[p] = None
            self._forget(rid)

    def _fail(self, slots: Sequence[int], err: BaseException, events: list[Event]) -> None:
        """Fails the requests of a step that raised; if the step consumed the (donated) cache
        the buffer is rebuilt and every live request fails with it."""
        if any(c.is_deleted() for c, _ in cache_leaves(self.caches)):
            self.caches = tuple(self.runner.empty_cache(self.cfg.slots))
            slots = self.table.live()
        msg = f"{type(err).__name__}: {err}"
        _LOG.error("a serving step failed, and its requests with it: %s", msg, exc_info=err)
        for p in slots:
            s = self.table.slots[p]
            if s is not None:
                events.append(Event(s.request.id, finish="error", error=msg))
                self.table.slots[p] = None
                self._forget(s.request.id)
                self.metrics.inc("einshard_requests_failed_total")

    def _sampling_rows(self, reqs: Sequence[Request | None], size: int) -> list[np.ndarray]:
        temp = np.zeros(size, np.float32)
        top_k = np.zeros(size, np.int32)
        top_p = np.ones(size, np.float32)
        seeds = np.zeros(size, np.uint32)
        for i, r in enumerate(reqs):
            if r is not None:
                sp = r.sampling
                temp[i], top_k[i], top_p[i], seeds[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed
        return [temp, top_k, top_p, seeds]

    def _admit(self, events: list[Event]) -> None:
        from runtime.model_runner import pack_prompts

        cfg, table = self.cfg, self.table
        waited = self.clock() - self.arrival[self.waiting[0].id] if self.waiting else 0.0
        k = choose_admissions(list(self.waiting), table.free_count(), len(table.live()), waited, cfg, self.T)
        if not k:
            return
        admitted = [(p, self.waiting.popleft()) for p in table.alloc(k)]
        for p, r in admitted:  # a prompt longer than the chunk budget: a slot now, its chunks later
            n = admitted_length(r, cfg)
            table.slots[p] = Slot(r, pos=n, prefilled=n)
        if cfg.policy == "static":
            self.static_width = table.width()
        dst = [p for p, r in admitted if admitted_length(r, cfg)]
        reqs = [r for _, r in admitted if admitted_length(r, cfg)]
        if not reqs:
            return
        k = len(reqs)
        lens = [admitted_length(r, cfg) for r in reqs]
        L = prompt_bucket(max(lens), self.T, cfg.min_bucket)
        B = batch_bucket(k, self.runner.valid_batch, max(cfg.slots, pow2_at_least(k)))
        prompts = [r.prompt[:n] for r, n in zip(reqs, lens)] + [(self.pad_token,)] * (B - k)
        tokens, pos = pack_prompts(prompts, L)
        dst_arr = np.array(dst + [cfg.slots] * (B - k), np.int32)
        sample_pos = np.array([len(r.prompt) for r in reqs] + [1] * (B - k), np.int32)
        try:
            fn = self.kernels.prefill(B, L)
            first, self.caches = fn(self.runner.params, self.caches, tokens, pos, dst_arr,
                                    *self._sampling_rows(reqs, B), sample_pos)
            first = np.asarray(first)
        except Exception as e:  # a failing step fails its requests, not the engine
            self._fail(dst, e, events)
            return
        self.metrics.inc("einshard_prefills_total")
        self.metrics.inc("einshard_prompt_tokens_total", sum(lens))
        for i, p in enumerate(dst):
            s = table.slots[p]
            if s is not None and s.decoding:
                self._emit(p, int(first[i]), events)

    def _chunk_args(self, pre: list[int], C: int) -> tuple[list[int], list[int], tuple]:
        """The prompt chunk rows of one forward: the oldest prefilling slots, as many as the
        layout's smallest batch holds (1 on one device), C tokens each; their arguments."""
        cfg, table = self.cfg, self.table
        B = batch_bucket(1, self.runner.valid_batch, max(cfg.slots, 1))
        sel = pre[:B]
        tokens = np.full((B, C), self.pad_token, np.int32)
        pos = np.tile(np.arange(C, dtype=np.int32), (B, 1))
        ends, reqs = [], []
        for i, p in enumerate(sel):
            prompt = table.at(p).request.prompt
            # the last chunk ends at the prompt's end: it re-reads a few cached tokens rather
            # than padding, so every chunk is C real tokens at positions below the context
            start = min(table.at(p).prefilled, len(prompt) - C)
            tokens[i] = prompt[start:start + C]
            pos[i] = np.arange(start, start + C)
            ends.append(start + C)
            reqs.append(table.at(p).request)
        src = np.array(sel + [cfg.slots] * (B - len(sel)), np.int32)
        sample_pos = np.array([len(r.prompt) for r in reqs] + [1] * (B - len(sel)), np.int32)
        return sel, ends, (src, tokens, pos, *self._sampling_rows(reqs, B), sample_pos)

    def _compact(self, events: list[Event]) -> None:
        perm = self.table.plan_compaction()
        if perm is None:
            return
        moved = [p for p in range(len(perm)) if perm[p] != p and self.table.slots[p] is not None]
        try:
            self.caches = self.kernels.compact()(self.caches, perm)
        except Exception as e:  # as a failing step: its requests fail, the engine goes on
            self._fail(moved, e, events)
            return
        self.metrics.inc("einshard_compactions_total")

    def _decode(self, events: list[Event]) -> None:
        """One forward over the decode window; under chunking, the oldest waiting prompt's next
        chunk (the budget minus the window's rows per device) rides in the same program."""
        table = self.table
        live = table.live()
        dec = [p for p in live if table.at(p).decoding]
        pre = sorted((p for p in live if not table.at(p).decoding), key=lambda p: self.arrival[table.at(p).request.id])
        if not dec and not pre:
            return
        w = max(self.static_width, table.width()) if dec else 0
        sel: list[int] = []
        if pre:
            C = chunk_length(w, self.cfg)
            sel, ends, cargs = self._chunk_args(pre, C)
        win = table.window(w)
        W = len(win)
        tokens = np.full(W, self.pad_token, np.int32)
        pos = np.zeros(W, np.int32)
        reqs: list[Request | None] = [None] * W
        for r, p in enumerate(win):
            s = table.slots[p]
            if s is None:
                continue
            pos[r] = s.pos  # a prefilling slot's write here is rewritten by its next chunk
            if s.decoding:
                tokens[r], reqs[r] = s.last_token, s.request
        dargs = (tokens, pos, *self._sampling_rows(reqs, W))
        params, k = self.runner.params, self.kernels
        try:
            if not sel:
                nxt, self.caches = k.decode(w)(params, self.caches, *dargs)
            elif not dec:
                first, self.caches = k.chunk(len(cargs[0]), C)(params, self.caches, *cargs)
            else:
                nxt, first, self.caches = k.mixed(w, len(cargs[0]), C)(params, self.caches, *dargs, *cargs)
            nxt_h = np.asarray(nxt) if dec else np.zeros(0, np.int32)
            first_h = np.asarray(first) if sel else np.zeros(0, np.int32)
        except Exception as e:  # as a failing step: its requests fail, the engine goes on
            self._fail(dec + sel, e, events)
            return
        m = self.metrics
        if dec:
            m.inc("einshard_decode_rows_total", W)
            m.inc("einshard_decode_useful_rows_total", len(dec))
            m.set("einshard_window_slots", W)
            for r, p in enumerate(win):
                s = table.slots[p]
                if s is not None and s.decoding and reqs[r] is not None:
                    s.pos += 1
                    self._emit(p, int(nxt_h[r]), events)
        if sel:
            m.inc("einshard_prefill_chunks_total", len(sel))
            m.inc("einshard_fused_chunk_steps_total", 1 if dec else 0)
            m.inc("einshard_prompt_tokens_total", sum(e - table.at(p).prefilled for p, e in zip(sel, ends)))
            for i, (p, end) in enumerate(zip(sel, ends)):
                s = table.at(p)
                s.prefilled = s.pos = end
                if s.decoding:
                    self._emit(p, int(first_h[i]), events)
