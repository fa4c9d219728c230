"""Name -> pass class. Passes register themselves; importing ``passes.all`` loads every one."""

from __future__ import annotations

from passes.base import Pass

PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name} registered twice")
    PASSES[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    import passes.all  # registers every pass as a side effect

    return dict(PASSES)
