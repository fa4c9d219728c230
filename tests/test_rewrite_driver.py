"""The rewrite driver reaches a fixed point or raises at its cap, never stops silently."""

from __future__ import annotations

import pytest

from ir.errors import PassError
from ir.module import Module
from passes.rewrite import Rule, drive

EMPTY = Module("m", (), ())


def counting(name: str, times: int) -> Rule:
    left = [times]

    def apply(m: Module) -> tuple[Module, int]:
        if left[0] == 0:
            return m, 0
        left[0] -= 1
        return m, 1

    return Rule(name, apply)


def test_fixed_point_counts_rounds() -> None:
    _, counts, rounds = drive(EMPTY, (counting("a", 2), counting("b", 1)), cap=2)
    assert counts == {"a": 2, "b": 1} and rounds == 3  # two rounds rewrite (the cap), the third confirms


def test_cap_hit_is_an_error_naming_the_rules() -> None:
    with pytest.raises(PassError, match=r"^pass error: cleanup: the rewrite rules still match after 4 rounds "
                                        r"\(round 5: forever \(1\)\)") as ei:
        drive(EMPTY, (counting("done", 1), counting("forever", 10**9)), cap=4, owner="cleanup")
    assert "undo each other" in (ei.value.hint or "")
