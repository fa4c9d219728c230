"""The engine on its own thread, for asyncio callers (the HTTP server).

The engine is single-threaded: only the engine thread touches it. Callers hand it requests and
aborts through an inbox under a lock; the thread drains the inbox at every iteration boundary,
steps, and hands each event to the caller's asyncio queue on the caller's loop. Validation and
the queue bound are checked at submit time, so a refused request fails at once (HTTP 400/503).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable

from runtime.serving.engine import Engine
from runtime.serving.errors import OverloadedError, ServingError
from runtime.serving.request import Event, Request


@dataclass(frozen=True)
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Event]"


class AsyncEngine:
    """``submit(req, queue)`` from a coroutine; events arrive on ``queue``; ``abort(id)`` any time."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.idle_wait = idle_wait
        self._lock = threading.Lock()
        self._inbox: list[tuple[Request, float]] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, _Sink] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="einshard-engine", daemon=True)
        self.error: BaseException | None = None
        #: called with (requests, aborts) before an iteration that does anything (lockstep.lead)
        self.before_iteration: Callable[[list[tuple[Request, float]], list[str]], None] | None = None

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, req: Request, queue: "asyncio.Queue[Event]") -> None:
        """Queues ``req``; raises ``RequestError`` or ``OverloadedError`` at once."""
        eng = self.engine
        try:
            eng.check(req)
        except ServingError:
            eng.metrics.inc("einshard_requests_rejected_total")
            raise
        with self._lock:
            if len(eng.waiting) + len(self._inbox) >= eng.cfg.max_queue:
                eng.metrics.inc("einshard_requests_rejected_total")
                raise OverloadedError(f"the queue is full ({eng.cfg.max_queue} requests waiting)",
                                      hint="retry later")
            self._sinks[req.id] = _Sink(asyncio.get_running_loop(), queue)
            self._inbox.append((req, eng.clock()))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def _deliver(self, events: list[Event]) -> None:
        for e in events:
            with self._lock:
                sink = self._sinks.pop(e.request_id, None) if e.finish else self._sinks.get(e.request_id)
            if sink is not None:
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, e)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop:
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                if self.before_iteration is not None and (inbox or aborts or eng.has_work()):
                    self.before_iteration(inbox, aborts)
                for req, t in inbox:
                    eng.submit(req, arrival=t)
                for rid in aborts:
                    if eng.abort(rid):
                        continue
                    with self._lock:  # already finished: nobody is waiting any more
                        self._sinks.pop(rid, None)
                if eng.has_work():
                    self._deliver(eng.step())
                else:
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
        except BaseException as e:  # the engine itself broke (not a step): fail everyone waiting
            self.error = e
            with self._lock:
                sinks, self._sinks = self._sinks, {}
            for rid, sink in sinks.items():
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait,
                                               Event(rid, finish="error", error=f"engine stopped: {e}"))
            raise

    def status(self) -> dict[str, Any]:
        return {"alive": self.alive, "waiting": len(self.engine.waiting), "live": len(self.engine.table.live())}
