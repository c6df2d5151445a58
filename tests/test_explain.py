"""The lines under a failure: what the peak is made of, and what moved since the baseline."""

from __future__ import annotations

import dataclasses

from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.verdict import Budget, judge

MIB = 2**20


def result(
    activations: int,
    grads: int = 4 * MIB,
    steps: tuple[int, ...] | None = None,
    ranks: tuple[MemoryResult, ...] = (),
    host: int = 0,
    label: str = "tiny-llama lora adamw bf16 b4 s128",
) -> MemoryResult:
    b = Breakdown(
        param_bytes=8 * MIB, grad_bytes=grads, optimizer_bytes=2 * MIB, activation_bytes=activations
    )
    return MemoryResult(
        label=label,
        meter="host",
        device="host-cpu",
        peak_bytes=b.total_bytes,
        step_peak_bytes=steps or (b.total_bytes - 2 * MIB, b.total_bytes),
        breakdown=b,
        host_offload_bytes=host,
        ranks=ranks,
    )


def verdict(now: MemoryResult, base: MemoryResult | None, gb: float | None = None, **kw):  # type: ignore[no-untyped-def]
    budget = Budget(None if gb is None else int(gb * 2**30), 0.05)
    return judge("t", now, budget, base, strict=False, update=False, record_hint="refresh", **kw)


def test_a_drift_names_the_terms_that_moved_largest_first_and_the_step() -> None:
    base = result(activations=10 * MIB)
    # step 1 as before; the peak of step 2 moved
    now = result(activations=20 * MIB, grads=int(4.5 * MIB), steps=(22 * MIB, 69 * MIB // 2))
    details = verdict(now, base).details
    assert details[0] == "  what moved, at the peak:"
    assert details[1].startswith(
        "    activations and temporaries: 10.00 MiB -> 20.00 MiB (+10.00 MiB, +100.0%)"
    )
    assert details[2].startswith("    gradients: 4.000 MiB -> 4.500 MiB (+512.0 KiB, +12.5%)")
    # parameters and optimizer state did not move: not listed
    assert not [line for line in details if "parameters" in line or "optimizer" in line]
    assert details[3].startswith("  step 2 of 2 moved most: ")


def test_a_term_under_its_own_tolerance_is_not_listed() -> None:
    base = result(activations=100 * MIB)
    now = result(activations=110 * MIB, grads=int(4.1 * MIB))  # grads +2.5%: within 5%
    lines = verdict(now, base).details
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == ["activations and temporaries"]


def test_zero_drift_names_each_rank_that_moved() -> None:
    r0, r1 = result(10 * MIB), result(10 * MIB)
    base = dataclasses.replace(result(10 * MIB), ranks=(r0, r1))
    now = dataclasses.replace(result(30 * MIB), ranks=(r0, result(30 * MIB)))
    details = verdict(now, base).details
    assert "  per rank:" in details
    assert details[-1].startswith("    rank 1: 24.00 MiB -> 44.00 MiB (+20.00 MiB")
    assert not [line for line in details if "rank 0" in line]


def test_a_budget_failure_says_what_the_peak_is_made_of() -> None:
    now = result(activations=20 * MIB, host=3 * MIB)
    details = verdict(now, None, gb=0.01).details
    assert details[0] == "  the peak is made of:"
    assert details[1].split() == ["activations", "and", "temporaries", "20.00", "MiB", "(58.8%)"]
    assert details[-1] == "    host offload (not in the peak): 3.000 MiB"


def test_a_changed_case_is_shown_against_what_the_test_had() -> None:
    stored = {"tiny-llama lora adamw bf16 b4 s128": 53 * MIB, "other b8": MIB}
    now = result(activations=MIB, label="tiny-llama lora adamw bf16 b8 s128")
    v = verdict(now, None, stored=stored)
    assert v.statuses == ("no-baseline",)
    assert v.details == (
        "  this test's stored cases (is this one of them, changed?):",
        "    [other b8]: 1.000 MiB",
        "    [tiny-llama lora adamw bf16 b4 s128]: 53.00 MiB",
    )


def test_a_passing_case_has_no_details() -> None:
    assert verdict(result(MIB), result(MIB), gb=1).details == ()


def test_ranks_that_moved_alike_share_a_line() -> None:
    same = [result(10 * MIB) for _ in range(8)]
    base = dataclasses.replace(result(10 * MIB), ranks=tuple(same))
    grown = [result(30 * MIB) if i in (0, 2, 3) else same[i] for i in range(8)]
    now = dataclasses.replace(result(30 * MIB), ranks=tuple(grown))
    ranks = [line for line in verdict(now, base).details if line.startswith("    rank")]
    assert ranks == ["    ranks 0, 2, 3: 24.00 MiB -> 44.00 MiB (+20.00 MiB, +83.3%)"]
    every = dataclasses.replace(result(30 * MIB), ranks=tuple(result(30 * MIB) for _ in range(8)))
    assert [line for line in verdict(every, base).details if "ranks" in line][-1].startswith(
        "    ranks 0-7: "
    )
