"""Serving across processes: process 0 runs the HTTP server and leads the engine; every other
process runs an identical engine that follows it, iteration by iteration.

Each engine step is an SPMD program over every process's devices, so all processes must step
at the same iterations with the same requests. The engine is deterministic given its inputs
and its clock (engine.py reads no other), so the leader publishes, for every iteration that
does anything, the requests and aborts it drained and the clock reading the iteration uses; a
follower applies the same and steps. Both engines read that one reading during the iteration
(an iteration clock), so the static policy's timeout decides alike everywhere.

Messages go through the jax.distributed coordinator's key-value store (ordered keys). A
follower trails the leader by at most one iteration (each step's collectives wait for it), so
the leader deletes keys a few iterations old.
"""

from __future__ import annotations

import base64
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime.serving.request import Request

PREFIX = "einshard/serve/"
#: Published iterations kept in the store (followers are at most one behind).
KEEP = 16
#: How long one blocking read waits before it looks again (the peer monitor catches a dead leader).
POLL_MS = 5_000


@dataclass(frozen=True)
class Iteration:
    """What the leader did at one iteration boundary (or ``stop``: the server shut down)."""

    now: float
    submits: tuple[tuple[Request, float], ...] = ()
    aborts: tuple[str, ...] = ()
    stop: bool = False


@dataclass
class IterationClock:
    """The engine's clock: one reading per iteration, set by whoever drives the iteration."""

    now: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return self.now


@dataclass
class Channel:
    """Ordered messages from process 0 to the others over the coordinator's key-value store.
    The payload is pickled: both ends are processes of this one run."""

    client: Any
    seq: int = 0

    def publish(self, it: Iteration) -> None:
        self.client.key_value_set(f"{PREFIX}{self.seq}", base64.b64encode(pickle.dumps(it)).decode())
        if self.seq >= KEEP:
            self.client.key_value_delete(f"{PREFIX}{self.seq - KEEP}")
        self.seq += 1

    def receive(self) -> Iteration:
        from jax.errors import JaxRuntimeError  # what the coordinator's client raises

        key = f"{PREFIX}{self.seq}"
        while True:
            try:
                raw = self.client.blocking_key_value_get(key, POLL_MS)
                break
            except JaxRuntimeError as e:  # a timeout: the leader is idle; anything else is real
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self.seq += 1
        return pickle.loads(base64.b64decode(raw))


def channel() -> Channel:
    """The channel of this multi-process run (jax.distributed must be initialized)."""
    from jax._src import distributed as jd

    if jd.global_state.client is None:
        raise RuntimeError("lockstep serving needs jax.distributed to be initialized")
    return Channel(jd.global_state.client)


def lead(async_engine: Any, ch: Channel) -> Callable[[], None]:
    """Makes process 0's AsyncEngine publish every iteration it runs; returns the function that
    tells the followers the server has stopped."""
    clock = IterationClock()
    async_engine.engine.clock = clock

    def before(inbox: list[tuple[Request, float]], aborts: list[str]) -> None:
        clock.now = time.monotonic()
        ch.publish(Iteration(clock.now, tuple(inbox), tuple(aborts)))

    async_engine.before_iteration = before
    return lambda: ch.publish(Iteration(time.monotonic(), stop=True))


def follow(engine: Any, ch: Channel) -> int:
    """Runs ``engine`` as the leader's iterations say until it stops; returns the steps taken.
    The events are the leader's to deliver: here they are dropped."""
    clock = IterationClock()
    engine.clock = clock
    steps = 0
    while True:
        it = ch.receive()
        if it.stop:
            return steps
        clock.now = it.now
        for req, t in it.submits:
            engine.submit(req, arrival=t)
        for rid in it.aborts:
            engine.abort(rid)
        if engine.has_work():
            engine.step()
            steps += 1
