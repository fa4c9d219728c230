"""A C-level SIGABRT handler that turns JAX's own abort into einshard's message.

When the coordinator (process 0) dies, JAX's error-polling thread sees the closed socket at once
and ends the process with a C++ fatal log line and ``abort()`` (exit 134), usually before any
Python code of ours has noticed. JAX's hook for that error (``missed_heartbeat_callback``)
cannot be used from Python in jaxlib 0.10 (it throws ``std::bad_cast`` converting the status),
and Python's own ``signal`` handlers never run for an abort from a C++ thread. So the handler
is installed with ``signal(2)`` through ctypes: ``abort()`` runs it synchronously on the
aborting thread, it takes the GIL like any callback, writes the message ``describe()`` gives
and leaves with ``os._exit(status)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Callable

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_installed: list[Any] = []  # the live callback object: ctypes must keep it alive


def install(describe: Callable[[], str], status: int) -> bool:
    """From now on an ``abort()`` anywhere in this process prints ``describe()`` to stderr and
    exits with ``status``; False where libc's ``signal`` is unavailable (the abort stays JAX's)."""
    try:
        libc = ctypes.CDLL(None)
        sig = libc.signal
    except (OSError, AttributeError):
        return False
    sig.restype = ctypes.c_void_p
    sig.argtypes = [ctypes.c_int, _HANDLER]

    def on_abort(_signum: int) -> None:
        try:
            text = describe()
        except BaseException as e:  # the report must not fail: say what we can
            text = f"aborted ({type(e).__name__} while describing why)"
        os.write(2, ("\n" + text + "\n").encode("utf-8", "replace"))
        os._exit(status)

    handler = _HANDLER(on_abort)
    _installed[:] = [handler]
    sig(signal.SIGABRT, handler)
    return True
