"""The slot table: which request lives in which row of the preallocated KV buffer (host side).

The S slots are split into G equal groups, one per batch shard of the cache (G = 1 unless the
layout shards the batch): physical slot ``g * (S // G) + j`` is row ``j`` of group ``g``. The
decode step runs on a *window*: rows ``j < w`` of every group, so under ``attn = batch`` every
device's part of the window is a dense prefix of its own rows (Flover's contiguous window, per
device). ``w`` comes from a few allowed sizes so only a few decode programs are compiled.

Compaction (Flover's buffer reordering) is planned here as a permutation of physical slots that
the engine applies to the cache on device in one gather; the table is updated to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.serving.request import Request


@dataclass
class Slot:
    """The state of one live request. ``pos`` is where the next decode step writes
    ``last_token`` (= tokens already in the cache); while a chunked prefill is under way
    ``prefilled < len(prompt)`` and the slot does not decode yet."""

    request: Request
    pos: int = 0
    last_token: int = 0
    generated: int = 0
    prefilled: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.request.prompt)


class SlotTable:
    """S slots in G groups, a window of ``w`` rows per group from ``widths`` (ascending)."""

    def __init__(self, slots: int, groups: int, widths: tuple[int, ...]):
        if slots % groups:
            raise ValueError(f"{slots} slots do not split into {groups} groups")
        self.size, self.groups, self.per = slots, groups, slots // groups
        if not widths or widths[-1] != self.per:
            raise ValueError(f"window widths {widths} must end with the group size {self.per}")
        self.widths = tuple(sorted(widths))
        self.slots: list[Slot | None] = [None] * slots

    def row(self, p: int) -> int:
        return p % self.per

    def group(self, p: int) -> int:
        return p // self.per

    def live(self) -> list[int]:
        return [p for p, s in enumerate(self.slots) if s is not None]

    def at(self, p: int) -> Slot:
        """The request in slot ``p``, which must be live (a free slot here is a scheduler bug)."""
        s = self.slots[p]
        if s is None:
            raise RuntimeError(f"slot {p} is free")
        return s

    def free_count(self) -> int:
        return sum(s is None for s in self.slots)

    def find(self, request_id: str) -> int | None:
        for p, s in enumerate(self.slots):
            if s is not None and s.request.id == request_id:
                return p
        return None

    def fit(self, rows: int) -> int:
        """The smallest allowed width with at least ``rows`` rows per group (0 for none)."""
        if rows <= 0:
            return 0
        return next(w for w in self.widths if w >= rows)

    def width(self) -> int:
        """The window the live slots need as they sit now (no moves)."""
        live = self.live()
        return self.fit(max(self.row(p) for p in live) + 1) if live else 0

    def window(self, w: int) -> list[int]:
        """Physical slots of window row r = g * w + j, the order the kernels' reshape gives."""
        return [g * self.per + j for g in range(self.groups) for j in range(w)]

    def alloc(self, n: int) -> list[int]:
        """``n`` free slots, lowest rows first (holes in the window before growing it), spread
        over the groups; the caller checks ``free_count`` first."""
        load = [0] * self.groups
        for p in self.live():
            load[self.group(p)] += 1
        free = sorted((p for p, s in enumerate(self.slots) if s is None),
                      key=lambda p: (self.row(p), load[self.group(p)], p))
        if len(free) < n:
            raise ValueError(f"{n} slots asked for, {len(free)} free")
        return free[:n]

    def plan_compaction(self) -> np.ndarray | None:
        """A permutation ``perm`` (new slot p takes old slot perm[p]) that moves the live slots
        into the smallest window that holds them, or None when that would not shrink the
        window. Moves stay inside a group where they can (no cross-device copy); the table is
        updated as if the permutation had been applied."""
        live = self.live()
        target = self.fit(-(-len(live) // self.groups))
        if target >= self.width():
            return None
        perm = np.arange(self.size, dtype=np.int32)
        movers = [p for p in live if self.row(p) >= target]
        holes = [p for p, s in enumerate(self.slots) if s is None and self.row(p) < target]
        for m in movers:
            same = [h for h in holes if self.group(h) == self.group(m)]
            h = (same or holes)[0]
            holes.remove(h)
            perm[h], perm[m] = m, h
            self.slots[h], self.slots[m] = self.slots[m], None
        return perm
