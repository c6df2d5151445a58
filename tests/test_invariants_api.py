"""Invariants between results and the leak check: pure functions of MemoryResult values."""

from __future__ import annotations

import pytest

from pytest_vram import Breakdown, MemoryResult
from pytest_vram.invariants import InvariantError, assert_le, assert_lt, assert_ordered
from pytest_vram.verdict import Budget, judge

MIB = 2**20


def result(
    label: str, *, params: int = 0, opt: int = 0, act: int = 0, steps: tuple[int, ...] = ()
) -> MemoryResult:
    breakdown = Breakdown(param_bytes=params, optimizer_bytes=opt, activation_bytes=act)
    peak = breakdown.total_bytes
    return MemoryResult(label, "host", "host-cpu", peak, steps or (peak, peak), breakdown)


def test_le_holds_and_fails_naming_both_cases_and_numbers() -> None:
    lora = result("lora", params=8 * MIB, opt=1 * MIB)
    full = result("full", params=8 * MIB, opt=16 * MIB)
    assert_le(lora, full)
    assert_le(lora, full, term="model_state")
    with pytest.raises(InvariantError) as info:
        assert_le(full, lora, term="optimizer")
    message = str(info.value)
    assert "expected optimizer of [full] <= [lora]" in message
    assert "16.000 MiB (16,777,216 B) vs 1.000 MiB (1,048,576 B): +15.000 MiB (+1500.0%)" in message


def test_slack_allows_a_bounded_excess_only() -> None:
    a = result("a", act=105 * MIB)
    b = result("b", act=100 * MIB)
    assert_le(a, b, slack=0.05)
    with pytest.raises(InvariantError, match=r"\(slack 4.0%\)"):
        assert_le(a, b, slack=0.04)


def test_lt_is_strict_and_ordered_reports_the_first_broken_pair() -> None:
    a, b = result("a", params=MIB), result("b", params=MIB)
    assert_le(a, b)
    with pytest.raises(InvariantError, match=r"\[a\] < \[b\]"):
        assert_lt(a, b)
    c = result("c", params=3 * MIB)
    d = result("d", params=2 * MIB)
    assert_ordered(a, b, c, term="params")
    with pytest.raises(InvariantError, match=r"\[c\] <= \[d\]"):
        assert_ordered(a, c, d, term="params")


def test_unknown_term_and_negative_slack_are_named() -> None:
    a = result("a", params=1)
    with pytest.raises(ValueError, match="unknown term 'vram'; known: peak, params"):
        assert_le(a, a, term="vram")
    with pytest.raises(ValueError, match="slack=-0.1 must be >= 0"):
        assert_le(a, a, slack=-0.1)


def verdict(steps: tuple[int, ...], leak_tolerance: float = 0.0) -> list[str]:
    r = result("case", act=max(steps), steps=steps)
    v = judge(
        "t::x", r, Budget(None, 0.05, leak_tolerance), r, strict=False, update=False, record_hint=""
    )
    return list(v.reasons)


def test_steady_steps_must_not_grow() -> None:
    # Step 1 is allowed to be lower (optimizer state is created at its end).
    assert verdict((100, 200, 200, 200)) == []
    reasons = verdict((100, 200, 200, 210))
    assert len(reasons) == 1
    assert (
        "peak grew from" in reasons[0]
        and "at step 3 to" in reasons[0]
        and "at step 4" in reasons[0]
    )
    assert (
        "(+5.00%, +10 B) beyond leak tolerance 0.0%: something is kept across steps [case]"
        in reasons[0]
    )
    assert verdict((100, 200, 200, 210), leak_tolerance=0.05) == []
    assert verdict((100, 200)) == []  # two steps: nothing steady to compare
