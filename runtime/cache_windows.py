"""Cache windows: a step traced over some rows of a larger KV buffer writes into that buffer.

The serving engine runs its decode step on a window (a few rows) of the slot buffer. Handing
the step the window as a sliced value made XLA copy those rows out of the donated buffer every
step (the step's cache update needs a buffer of its own to write in place), then write the
changed positions back: at 4 of 8 slots x 512 positions that copy (60 arrays) cost more than
the rest of the step's attention. While a caller traces a step inside :func:`windows`, the
``cache_update`` rule (runtime/kernels.py) finds each window value here and calls its writer
instead: the new rows go straight into the whole buffer (in place, it is donated) and the
attention reads the window back from it, a slice XLA fuses into its reader. No copy is left.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

#: id(window value) -> writer(new[B, L, ...], pos[B, L]) -> the updated window value
Writer = Callable[[Any, Any], Any]
_WRITERS: dict[int, Writer] = {}


@contextmanager
def windows(writers: Mapping[int, Writer]) -> Iterator[None]:
    """Registers writers by the id of the window values they stand for, while tracing."""
    _WRITERS.update(writers)
    try:
        yield
    finally:
        for k in writers:
            _WRITERS.pop(k, None)


def writer(cache: Any) -> Writer | None:
    """The writer registered for this cache value (the very object), if any."""
    return _WRITERS.get(id(cache))
