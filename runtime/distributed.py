"""Multi-process execution on ``jax.distributed``: one controller per process, one mesh over all.

Every process runs the same program. :func:`initialize` joins the process group (on CPU each
process gets ``local_devices`` simulated devices and gloo collectives); afterwards
``jax.devices()`` lists every process's devices, so the mesh of ``runtime.lower_jax.make_mesh``
spans them unchanged. Inputs are built with :func:`global_array`, which asks a callback only for
the slices this process's devices hold, and results come back with :func:`to_host`, which
all-gathers a global array to every process (process 0 alone prints).

Faults must not hang and must name the process that died: a watchdog thread bounds joining; a
peer monitor (counters in the coordinator's key-value store) names a silent process or a lost
coordinator; a collective whose peer died raises in Python and :func:`collective_errors`
retypes it; and JAX's own abort (its reaction to a lost coordinator, often the first) is caught
by runtime/abort_guard.py and reported the same way. Every path exits with status 1.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ir.errors import DistributedError
from runtime import abort_guard

#: Exit status of a process whose watchdog fired (the CLI's documented-error status).
WATCHDOG_EXIT = 1
#: Seconds a finished process waits at JAX's exit barrier for the others (process 0 may still be
#: checking against the reference); a peer that dies meanwhile is caught by the peer monitor.
SHUTDOWN_TIMEOUT = 600


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a multi-process run, and how long it waits for the others."""

    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    local_devices: int  # simulated CPU devices of this process (ignored on accelerators)
    init_timeout: int = 60  # seconds for every process to register
    peer_timeout: int = 30  # seconds without a sign of life after which a peer counts as dead

    @property
    def name(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"

    @property
    def is_primary(self) -> bool:
        return self.process_id == 0


_group: ProcessGroup | None = None
#: Set when the interpreter exits: from then on processes leave one by one (JAX's exit barrier,
#: then process 0 stops the coordinator) and the peer monitor keeps beating but reports nothing.
_stopping = threading.Event()


def current() -> ProcessGroup | None:
    """The group this process joined (None: a single-process run)."""
    return _group


def is_primary() -> bool:
    """Whether this process prints (process 0, or the only process)."""
    return _group is None or _group.is_primary


def _watchdog(seconds: float, message: Callable[[], str]) -> threading.Timer:
    """A daemon timer that prints ``message`` and ends the process: the last resort when a C++
    call blocks (the GIL is released there, so the thread runs)."""

    def fire() -> None:
        sys.stderr.write(message() + "\n")
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def _check_port_free(group: ProcessGroup) -> None:
    """Process 0 binds the coordinator's port on every interface, as JAX's service will: a port in
    use is reported here, because jaxlib 0.10's service may crash (SIGSEGV) when its bind fails."""
    port = int(group.coordinator.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return
        except OSError as e:
            raise DistributedError(f"{group.name}: cannot start the coordinator on {group.coordinator}: "
                                   f"port {port}: {e.strerror or e}",
                                   hint="the port is in use; pick a free one (einshard launch picks one itself)"
                                   ) from None
        finally:
            s.close()


def _native_stdout_to_stderr() -> None:
    """gloo (C++) prints its connection notices on file descriptor 1, which would corrupt process
    0's output (``--json``): native writes to fd 1 go to stderr from here on, Python's
    ``sys.stdout`` keeps the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                           errors=sys.stdout.errors or "strict")


def initialize(group: ProcessGroup) -> None:
    """Joins the process group; must run before anything touches a JAX backend.

    DistributedError when the coordinator cannot start (port in use) or the peers do not all
    register within ``group.init_timeout`` seconds (then the watchdog ends the process)."""
    global _group, _monitor
    import jax

    if _group is not None:
        if _group != group:
            raise DistributedError(f"{group.name}: already joined a different group ({_group})")
        return
    if group.is_primary:
        _check_port_free(group)
    _native_stdout_to_stderr()
    jax.config.update("jax_num_cpu_devices", group.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    wd = _watchdog(group.init_timeout, lambda: DistributedError(
        f"{group.name}: the other processes did not all join the coordinator at {group.coordinator} "
        f"within {group.init_timeout} s (--init-timeout)",
        hint="start every process with the same --coordinator and --num-processes, and distinct "
             f"--process-id 0..{group.num_processes - 1}; process 0 must be among them").render())
    abort_guard.install(lambda: _abort_report(group), WATCHDOG_EXIT)  # JAX's abort names the dead process
    try:
        # JAX's own deadline a little later than the watchdog's: its abort is a C++ log line
        # JAX's heartbeat deadline well after the peer monitor's, which names the lost process
        jax.distributed.initialize(coordinator_address=group.coordinator, num_processes=group.num_processes,
                                   process_id=group.process_id, initialization_timeout=group.init_timeout + 5,
                                   heartbeat_timeout_seconds=3 * group.peer_timeout + 10,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
    except Exception as e:  # JaxRuntimeError: the RPC server could not bind, or registration failed
        wd.cancel()
        text = str(e)
        if "RPC server" in text or "address" in text.lower():
            raise DistributedError(f"{group.name}: cannot start the coordinator on {group.coordinator}: {text}",
                                   hint="the port is in use; pick a free one (einshard launch picks one itself)"
                                   ) from None
        raise DistributedError(f"{group.name}: cannot join the coordinator at {group.coordinator}: {text}") from None
    wd.cancel()
    _group = group
    from jax._src import distributed as jd

    if jd.global_state.client is not None:
        _monitor = _PeerMonitor(group, jd.global_state.client)
        _monitor.start()
        atexit.register(_stopping.set)  # runs before JAX's shutdown, registered earlier
    n = jax.device_count()
    if jax.local_device_count() * group.num_processes != n:
        raise DistributedError(f"{group.name}: {jax.local_device_count()} local devices, {n} in all: every "
                               f"process must bring the same number")


class _PeerMonitor(threading.Thread):
    """Every process writes a counter to the coordinator's key-value store each ``period`` s and
    watches the others'; a counter that stops for ``peer_timeout`` s names the dead process, and
    a store that stops answering means the coordinator (process 0) is gone. JAX notices a dead
    peer too, but only by aborting, so its heartbeat timeout is set well above this one (and its
    abort for a lost coordinator is reported by :func:`_abort_report`)."""

    def __init__(self, group: ProcessGroup, client: Any, period: float = 1.0):
        super().__init__(name="einshard-peer-monitor", daemon=True)
        self.group, self.client, self.period = group, client, period
        self._seen: dict[int, tuple[str, float]] = {}  # process -> (last counter, when it changed)

    def silent(self) -> dict[int, float]:
        """Seconds since each other process's counter last changed."""
        now = time.monotonic()
        return {pid: now - t for pid, (_, t) in list(self._seen.items())}

    def run(self) -> None:
        g, prefix = self.group, "einshard/alive/"
        beat = 0
        while True:
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{prefix}{g.process_id}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(prefix))
            except Exception as e:  # the coordinator (process 0) is gone, or shut down at the end
                if _stopping.is_set():
                    return
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _fail(f"{g.name}: {_coordinator_died(g)} (its key-value store stopped answering: {first})")
            beat += 1
            for pid in range(g.num_processes):
                if pid == g.process_id:
                    continue
                v = values.get(f"{prefix}{pid}", "")
                if pid not in self._seen or self._seen[pid][0] != v:
                    self._seen[pid] = (v, now)
                elif now - self._seen[pid][1] > g.peer_timeout and not _stopping.is_set():
                    _fail(f"{g.name}: process {pid} has died (no sign of life for {g.peer_timeout} s, "
                          f"--peer-timeout)")
            time.sleep(self.period)


_monitor: _PeerMonitor | None = None
_HINT_OTHERS = "see the other processes' output (einshard launch shows it)"


def _fail(message: str) -> None:
    sys.stderr.write(DistributedError(message, hint=_HINT_OTHERS).render() + "\n")
    abandon()


def _coordinator_died(g: ProcessGroup) -> str:
    return f"process 0 (the coordinator at {g.coordinator}) has died"


def _coordinator_up(g: ProcessGroup, timeout: float = 1.0) -> bool:
    """Whether process 0's coordinator port still accepts connections (a live process accepts
    even while busy: the kernel completes the handshake)."""
    host, _, port = g.coordinator.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def lost_process(g: ProcessGroup, wait: float = 0.0) -> str | None:
    """Which other process has died, as a phrase (\"process 0 (the coordinator ...) has died\"),
    looking for up to ``wait`` s: a coordinator whose port is closed, else the process the peer
    monitor has heard nothing from for ``peer_timeout`` s (for ``wait=0``: the quietest one
    silent for over 3 beats). None when no process can be named."""
    deadline = time.monotonic() + wait
    while True:
        if not g.is_primary and not _coordinator_up(g):
            return _coordinator_died(g)
        silent = _monitor.silent() if _monitor is not None else {}
        limit = g.peer_timeout if wait else 3 * (_monitor.period if _monitor else 1.0)
        quiet = {pid: s for pid, s in silent.items() if s > limit}
        if quiet:
            pid = max(quiet, key=quiet.__getitem__)
            return f"process {pid} has died (no sign of life for {quiet[pid]:.0f} s)"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


def _abort_report(g: ProcessGroup) -> str:
    """The message for JAX's own abort (runtime/abort_guard.py): who died, as far as we can tell."""
    who = lost_process(g) or "another process has failed, or this one lost its network"
    return DistributedError(f"{g.name}: {who}; JAX's distributed runtime aborted this process "
                            f"(its log line is above)", hint=_HINT_OTHERS).render()


#: Substrings of the errors JAX raises when a collective's peer is gone.
_PEER_LOST = ("Gloo", "Connection closed by peer", "Connection reset", "heartbeat", "coordination service",
              "Broken pipe")


@contextmanager
def collective_errors() -> Iterator[None]:
    """Retypes a collective that failed because a peer died as a DistributedError naming this
    process and, once the peer monitor can tell (up to ``peer_timeout`` s), the one that died
    (inside a multi-process run; elsewhere errors pass through untouched)."""
    try:
        yield
    except Exception as e:
        if _group is None or isinstance(e, DistributedError) or not any(s in str(e) for s in _PEER_LOST):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = lost_process(_group, wait=_group.peer_timeout + 2.0) or "another process has probably died"
        raise DistributedError(f"{_group.name}: a collective failed because {who}: {first}",
                               hint=_HINT_OTHERS) from None


def abandon(status: int = WATCHDOG_EXIT) -> None:
    """Ends this process now, without JAX's exit-time shutdown barrier: with a peer gone it would
    wait out its timeout and then abort, and a process that failed alone must go at once so the
    others' peer monitors see it (at the barrier it would keep beating while they wait for it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def is_lazy(a: Any) -> bool:
    """Whether ``a`` is a checkpoint weight not read yet (runtime.sliced_weights.LazyWeight):
    pass it to :func:`global_array` as it is, so each process reads only its blocks."""
    return type(a).__name__ == "LazyWeight" and hasattr(a, "read")


def global_array(shape: tuple[int, ...], dtype: Any, sharding: Any, fetch: Callable[[Any], Any]) -> Any:
    """A jax.Array over ``sharding`` whose shards come from ``fetch(index)``; JAX asks only for
    the indices of this process's devices, so a process reads only what it holds."""
    import jax

    blocks: dict[tuple, np.ndarray] = {}  # JAX asks once per device: a block replicated over local devices is read once

    def block(idx: Any) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)
        if key not in blocks:
            blocks[key] = np.asarray(fetch(idx), dtype=dtype)
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, block)


def to_host(x: Any) -> np.ndarray:
    """A (possibly global) jax.Array as one numpy array on every process: an all-gather over
    processes when some of its shards live elsewhere."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    with collective_errors():
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
