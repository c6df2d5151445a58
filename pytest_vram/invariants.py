"""Relations between measured cases: ``qlora <= lora``, ``offload <= no offload``.

A failure names both cases and both numbers, so a broken ordering reads like the bug it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from pytest_vram.result import MemoryResult

__all__ = ["TERMS", "InvariantError", "assert_le", "assert_lt", "assert_ordered", "term_bytes"]

TERMS: Final[Mapping[str, Callable[[MemoryResult], int]]] = {
    "peak": lambda r: r.peak_bytes,
    "params": lambda r: r.breakdown.param_bytes,
    "grads": lambda r: r.breakdown.grad_bytes,
    "optimizer": lambda r: r.breakdown.optimizer_bytes,
    "activations": lambda r: r.breakdown.activation_bytes,
    "host_offload": lambda r: r.host_offload_bytes,
    # What estimators call model states: what the method and optimizer choose to keep.
    "model_state": lambda r: (
        r.breakdown.param_bytes
        + r.breakdown.buffer_bytes
        + r.breakdown.grad_bytes
        + r.breakdown.optimizer_bytes
    ),
}


class InvariantError(AssertionError):
    """An expected ordering between two cases does not hold."""


def term_bytes(result: MemoryResult, term: str) -> int:
    if term not in TERMS:
        raise ValueError(f"unknown term {term!r}; known: {', '.join(TERMS)}")
    return TERMS[term](result)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB ({nbytes:,d} B)"


def _check(a: MemoryResult, b: MemoryResult, term: str, slack: float, strict: bool) -> None:
    """Per rank when both cases ran the same number of ranks (ZeRO), else the cases' numbers."""
    __tracebackhide__ = True
    if slack < 0:
        raise ValueError(f"slack={slack!r} must be >= 0")
    if a.ranks and len(a.ranks) == len(b.ranks):
        for rank, (ra, rb) in enumerate(zip(a.ranks, b.ranks, strict=True)):
            _check_one(ra, rb, term, slack, strict, f" on rank {rank}")
    else:
        _check_one(a, b, term, slack, strict, "")


def _check_one(
    a: MemoryResult, b: MemoryResult, term: str, slack: float, strict: bool, where: str
) -> None:
    __tracebackhide__ = True
    left, right = term_bytes(a, term), term_bytes(b, term)
    limit = right * (1 + slack)
    if left < limit or (not strict and left <= limit):
        return
    op = "<" if strict else "<="
    over = left - right
    pct = f"{over / right:+.1%}" if right else "n/a"
    allowed = f" (slack {slack:.1%})" if slack else ""
    raise InvariantError(
        f"expected {term} of [{a.label}] {op} [{b.label}]{where}{allowed}, but "
        f"{_mib(left)} vs {_mib(right)}: {over / 2**20:+.3f} MiB ({pct})"
    )


def assert_le(a: MemoryResult, b: MemoryResult, *, term: str = "peak", slack: float = 0.0) -> None:
    """``term(a) <= term(b) * (1 + slack)``."""
    __tracebackhide__ = True
    _check(a, b, term, slack, strict=False)


def assert_lt(a: MemoryResult, b: MemoryResult, *, term: str = "peak") -> None:
    """``term(a) < term(b)``."""
    __tracebackhide__ = True
    _check(a, b, term, 0.0, strict=True)


def assert_ordered(*results: MemoryResult, term: str = "peak", slack: float = 0.0) -> None:
    """``term(r0) <= term(r1) <= ...``; the first broken pair is reported."""
    __tracebackhide__ = True
    for a, b in zip(results, results[1:], strict=False):
        _check(a, b, term, slack, strict=False)
