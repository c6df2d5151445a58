"""What a failing number is made of, and what moved: the lines under a budget, drift or leak
failure, so the user sees which term grew and where without rerunning anything.

Pure functions of results (torch-free): the pytest process writes them, and the baseline
already stores the whole breakdown, per step and per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from pytest_vram.result import MemoryResult
from pytest_vram.units import format_bytes, format_pair

__all__ = ["change", "drift", "made_of", "moved"]

_INDENT: Final = "  "
_HOST: Final = "host offload (not in the peak)"


def _terms(result: MemoryResult) -> Iterator[tuple[str, int]]:
    yield from result.breakdown.rows()
    yield _HOST, result.host_offload_bytes


def drift(before: int, after: int) -> float:
    """The relative change, from the difference: 1050 / 1000 - 1 is 0.05000000000000004, which
    a 5% tolerance would refuse."""
    return (after - before) / before if before else float("inf")


def change(before: int, after: int) -> str:
    """``22.00 MiB -> 32.00 MiB (+10.00 MiB, +45.5%)``; no % from zero."""
    shown_before, shown_after = format_pair(before, after)
    share = f", {drift(before, after):+.1%}" if before else ""
    return f"{shown_before} -> {shown_after} ({format_bytes(after - before, sign=True)}{share})"


def made_of(result: MemoryResult) -> list[str]:
    """The peak's terms, largest first, each with its share of the peak; for ZeRO, each rank."""
    peak = result.peak_bytes
    rows = sorted(result.breakdown.rows(), key=lambda row: -row[1])
    width = max(len(name) for name, _ in rows)
    lines = [f"{_INDENT}the peak is made of:"]
    for name, nbytes in rows:
        share = f" ({nbytes / peak:.1%})" if peak else ""
        lines.append(f"{_INDENT * 2}{name:<{width}}  {format_bytes(nbytes)}{share}")
    if result.host_offload_bytes:
        lines.append(f"{_INDENT * 2}{_HOST}: {format_bytes(result.host_offload_bytes)}")
    if len(result.ranks) > 1:
        peaks = ", ".join(
            f"rank {i} {format_bytes(r.peak_bytes)}" for i, r in enumerate(result.ranks)
        )
        lines.append(f"{_INDENT}per rank: {peaks}")
    return lines


def _moved_terms(base: MemoryResult, now: MemoryResult, tolerance: float) -> list[str]:
    before = dict(_terms(base))
    after = dict(_terms(now))
    changed = []
    for name, old in before.items():
        new = after[name]
        # A term that appears, or moves beyond the tolerance of its own size.
        if new != old and (old == 0 or abs(new - old) / old > tolerance):
            changed.append((abs(new - old), f"{_INDENT * 2}{name}: {change(old, new)}"))
    return [line for _, line in sorted(changed, key=lambda pair: -pair[0])]


def _moved_step(base: MemoryResult, now: MemoryResult) -> str | None:
    old, new = base.step_peak_bytes, now.step_peak_bytes
    if len(old) != len(new) or not old:
        return None
    step = max(range(len(old)), key=lambda i: abs(new[i] - old[i]))
    if new[step] == old[step]:
        return None
    return f"{_INDENT}step {step + 1} of {len(old)} moved most: {change(old[step], new[step])}"


def _ranks(numbers: list[int]) -> str:
    """``rank 3``, ``ranks 0-7``, ``ranks 0, 2, 5``."""
    if len(numbers) == 1:
        return f"rank {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"ranks {numbers[0]}-{numbers[-1]}"
    return "ranks " + ", ".join(map(str, numbers))


def _moved_ranks(base: MemoryResult, now: MemoryResult) -> list[str]:
    """Each rank whose peak moved, largest change first; ranks that moved alike on one line."""
    if len(base.ranks) != len(now.ranks) or len(now.ranks) < 2:
        return []
    alike: dict[tuple[int, int], list[int]] = {}
    for i, (b, n) in enumerate(zip(base.ranks, now.ranks, strict=True)):
        if b.peak_bytes != n.peak_bytes:
            alike.setdefault((b.peak_bytes, n.peak_bytes), []).append(i)
    changes = sorted(alike.items(), key=lambda item: -abs(item[0][1] - item[0][0]))
    return [f"{_INDENT * 2}{_ranks(ranks)}: {change(old, new)}" for (old, new), ranks in changes]


def moved(base: MemoryResult, now: MemoryResult, tolerance: float) -> list[str]:
    """The terms of the worst rank's peak that moved beyond ``tolerance`` of their own size,
    largest change first; the step whose peak moved most; for ZeRO, each rank that moved."""
    lines = []
    terms = _moved_terms(base, now, tolerance)
    if terms:
        lines.append(f"{_INDENT}what moved, at the peak:")
        lines.extend(terms)
    step = _moved_step(base, now)
    if step:
        lines.append(step)
    ranks = _moved_ranks(base, now)
    if ranks:
        lines.append(f"{_INDENT}per rank:")
        lines.extend(ranks)
    return lines
