"""``verdict.judge`` on plain values: budget, capacity, leak and baseline drift at and around their
limits, without a session, a worker or a step. The same verdicts through pytest are
test_plugin_verdict.py."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from pytest_vram.result import GIB, Breakdown, MemoryResult
from pytest_vram.units import parse_fraction
from pytest_vram.verdict import Budget, CaseVerdict, judge, versions_changed

HINT = "pytest-vram refresh 'test_mem.py::test_case'"


def result(
    peak: int,
    steps: tuple[int, ...] = (),
    *,
    versions: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
    notes: tuple[str, ...] = (),
) -> MemoryResult:
    return MemoryResult(
        label="case",
        meter="host",
        device="host-cpu",
        peak_bytes=peak,
        step_peak_bytes=steps or (peak,),
        breakdown=Breakdown(param_bytes=peak // 2, activation_bytes=peak - peak // 2),
        versions=versions or {"torch": "2.5.0"},
        environment=environment or {},
        notes=notes,
    )


def check(
    measured: MemoryResult,
    budget: Budget,
    baseline: MemoryResult | None,
    *,
    strict: bool = False,
    update: bool = False,
    capacity_bytes: int | None = None,
) -> CaseVerdict:
    return judge(
        "test_case",
        measured,
        budget,
        baseline,
        strict=strict,
        update=update,
        record_hint=HINT,
        capacity_bytes=capacity_bytes,
    )


def test_budget_from_gib_is_in_bytes_and_none_is_no_ceiling() -> None:
    assert Budget.from_gib(1.5, 0.05) == Budget(3 * GIB // 2, 0.05, 0.0)
    assert Budget.from_gib(None, 0.1, 0.02) == Budget(None, 0.1, 0.02)


@pytest.mark.parametrize(
    ("peak", "statuses"),
    [(GIB - 1, ("ok",)), (GIB, ("ok",)), (GIB + 1, ("over-budget",))],
    ids=["below", "at", "one-byte-over"],
)
def test_budget_at_the_limit_passes_and_one_byte_over_fails(peak: int, statuses: tuple) -> None:
    verdict = check(result(peak), Budget(GIB, 0.05), result(peak))
    assert verdict.statuses == statuses
    assert verdict.failed is (statuses != ("ok",))
    if verdict.failed:
        (reason,) = verdict.reasons
        assert reason.startswith("peak 1.000000001 GiB exceeds budget 1.000000000 GiB")
        assert reason.endswith("[case]")


def test_no_budget_judges_the_baseline_only() -> None:
    verdict = check(result(100 * GIB), Budget(None, 0.05), result(100 * GIB))
    assert (verdict.statuses, verdict.failed) == (("ok",), False)


def test_capacity_at_the_peak_fits_and_beyond_it_is_out_of_memory() -> None:
    budget = Budget(GIB, 0.05)
    assert check(result(GIB), budget, result(GIB), capacity_bytes=GIB).statuses == ("ok",)
    over = check(result(GIB + 1), budget, result(GIB + 1), capacity_bytes=GIB)
    assert over.statuses == ("over-capacity", "over-budget")
    assert over.reasons[0].startswith("out of memory predicted: peak 1.000000001 GiB exceeds")
    assert "by 1 B" in over.reasons[0]


@pytest.mark.parametrize("tolerance", [0.05, "5%"], ids=["fraction", "percentage"])
@pytest.mark.parametrize(
    ("peak", "status"),
    [(1049, "ok"), (1051, "drift-up"), (951, "ok"), (949, "drift-down")],
)
def test_tolerance_as_fraction_or_percentage(tolerance: object, peak: int, status: str) -> None:
    budget = Budget(None, parse_fraction("tolerance", tolerance))
    verdict = check(result(peak), budget, result(1000))
    assert verdict.statuses == (status,)
    assert verdict.failed is (status == "drift-up")  # down is a note unless strict


@pytest.mark.parametrize(("peak", "tolerance"), [(1050, 0.05), (950, 0.05), (1070, 0.07)])
def test_drift_of_exactly_the_tolerance_is_not_beyond_it(peak: int, tolerance: float) -> None:
    assert check(result(peak), Budget(None, tolerance), result(1000)).statuses == ("ok",)


def test_zero_tolerance_fails_a_one_byte_drift_and_passes_none() -> None:
    assert check(result(1001), Budget(None, 0.0), result(1000)).statuses == ("drift-up",)
    assert check(result(1000), Budget(None, 0.0), result(1000)).statuses == ("ok",)


def test_drift_up_says_what_changed_since_the_baseline() -> None:
    budget = Budget(None, 0.05)
    (same,) = check(result(1100), budget, result(1000)).reasons
    assert same == (
        "peak 1.074 KiB is +10.0% (+100 B) from baseline 0.977 KiB, beyond tolerance 5.0% "
        "[case]; no library version changed since the baseline"
    )
    newer = result(1100, versions={"torch": "2.6.0"}, environment={"NCCL_ALGO": "Ring"})
    old = result(1000, environment={"NCCL_ALGO": "Tree"})
    (reason,) = check(newer, budget, old).reasons
    assert reason.endswith(
        "versions changed since the baseline: torch 2.5.0 -> 2.6.0; "
        "environment changed: NCCL_ALGO Tree -> Ring"
    )
    env = {"NCCL_ALGO": "Tree"}
    (kept,) = check(result(1100, environment=env), budget, result(1000, environment=env)).reasons
    assert kept.endswith("; the recorded environment is the same")


def test_drift_down_is_a_note_with_the_refresh_hint_and_fails_only_when_strict() -> None:
    budget = Budget(None, 0.05)
    loose = check(result(900), budget, result(1000))
    assert (loose.statuses, loose.failed, loose.reasons) == (("drift-down",), False, ())
    (note,) = loose.notes
    assert note.startswith("peak 900 B is -10.0% (-100 B) from baseline 1,000 B")
    assert note.endswith(f"; tighten the baseline with: {HINT}")
    strict = check(result(900), budget, result(1000), strict=True)
    assert (strict.statuses, strict.failed, strict.reasons, strict.notes) == (
        ("drift-down",),
        True,
        (note,),
        (),
    )


def test_a_baseline_of_zero_bytes_is_drift_up_from_any_peak() -> None:
    assert check(result(1), Budget(None, 0.99), result(0)).statuses == ("drift-up",)
    assert check(result(0), Budget(None, 0.0), result(0)).statuses == ("ok",)


def test_no_baseline_fails_with_the_device_and_the_command_to_record_it() -> None:
    verdict = check(result(1000), Budget(GIB, 0.05), None)
    assert (verdict.statuses, verdict.failed) == (("no-baseline",), True)
    assert verdict.reasons == (
        f"no baseline for [case] on device host-cpu; record it with: {HINT}",
    )


def test_update_records_and_names_the_action_but_still_fails_the_budget() -> None:
    budget = Budget(2000, 0.05)
    created = check(result(1000), budget, None, update=True)
    assert (created.statuses, created.action, created.failed) == (("recorded",), "created", False)
    assert check(result(1000), budget, result(1000), update=True).action == "unchanged"
    moved = check(result(1500), budget, result(1000), update=True)  # +50%: no drift under update
    assert (moved.statuses, moved.action, moved.failed) == (("recorded",), "updated", False)
    over = check(result(3000), budget, result(3000), update=True)
    assert (over.statuses, over.action, over.failed) == (
        ("over-budget", "recorded"),
        "unchanged",
        True,
    )


@pytest.mark.parametrize(
    ("steps", "leak_tolerance", "leaks"),
    [
        ((500, 1000, 1000), 0.0, False),  # step 1 creates the optimizer state: growth allowed
        ((1000, 1000, 1001), 0.0, True),
        ((1000, 1000, 1050), 0.05, False),
        ((1000, 1000, 1051), 0.05, True),
        ((1000, 5000), 0.0, False),  # two steps: nothing steady to compare
        ((0, 0, 100), 0.0, False),  # a step that held nothing is no reference
    ],
)
def test_leak_is_growth_after_step_two_beyond_its_tolerance(
    steps: tuple[int, ...], leak_tolerance: float, leaks: bool
) -> None:
    peak = max(steps)
    verdict = check(result(peak, steps), Budget(None, 0.05, leak_tolerance), result(peak, steps))
    assert verdict.statuses == (("leak",) if leaks else ("ok",))
    assert verdict.failed is leaks


def test_leak_names_the_first_steps_that_grew() -> None:
    steps = (1000, 1000, 1000, 2000, 4000)
    (reason,) = check(result(4000, steps), Budget(None, 0.05), result(4000, steps)).reasons
    assert reason.startswith(
        "peak grew from 1,000 B at step 3 to 1.953 KiB at step 4 (+100.00%, +1,000 B)"
    )
    assert reason.endswith("beyond leak tolerance 0.0%: something is kept across steps [case]")


def test_every_failure_is_listed_in_order() -> None:
    steps = (1000, 1000, 3000)
    verdict = check(result(3000, steps), Budget(2000, 0.05), result(1000), capacity_bytes=2500)
    assert verdict.statuses == ("over-capacity", "over-budget", "leak", "drift-up")
    assert len(verdict.reasons) == 4 and verdict.failed


def test_the_results_notes_are_the_verdicts_notes() -> None:
    noted = result(1000, notes=("paging fell back on CPU",))
    verdict = check(noted, Budget(None, 0.05), result(1000))
    assert (verdict.notes, verdict.failed) == (("paging fell back on CPU",), False)


def test_versions_changed_lists_the_libraries_first_then_the_others_by_name() -> None:
    old = {"zlib": "1", "peft": "0.13", "torch": "2.5", "python": "3.11", "accelerate": "1.0"}
    new = {"zlib": "2", "peft": "0.14", "torch": "2.6", "python": "3.11", "deepspeed": "0.16"}
    assert versions_changed(old, new) == [
        "torch 2.5 -> 2.6",
        "peft 0.13 -> 0.14",
        "accelerate 1.0 -> -",
        "deepspeed - -> 0.16",
        "zlib 1 -> 2",
    ]
    assert versions_changed(new, new) == []


def test_row_is_plain_data_holding_the_whole_result() -> None:
    measured = result(1500, notes=("n",))
    row = check(measured, Budget(1000, 0.05), None).row()
    assert {k: v for k, v in row.items() if k != "result"} == {
        "test": "test_case",
        "label": "case",
        "peak_bytes": 1500,
        "budget_bytes": 1000,
        "baseline_bytes": None,
        "status": "over-budget,no-baseline",
        "failed": True,
        "action": None,
        "notes": ["n"],
        "reasons": list(check(measured, Budget(1000, 0.05), None).reasons),
        "details": list(check(measured, Budget(1000, 0.05), None).details),
    }
    assert MemoryResult.from_dict(row["result"]) == measured


def test_section_shows_the_breakdown_budget_and_baseline() -> None:
    lines = check(result(GIB), Budget(2 * GIB, 0.05), result(GIB)).section().splitlines()
    assert lines[0] == "case  (meter host, device host-cpu)"
    half = f"{0.5:10.4f} GiB  {GIB // 2:>16,d} B"
    assert lines[1] == f"  parameters                   {half}"
    assert lines[5] == f"  activations and temporaries  {half}"
    assert lines[6] == f"  peak                         {1.0:10.4f} GiB  {GIB:>16,d} B"
    assert lines[7:] == [
        "  per-step peaks (GiB): 1.0000",
        "  trainable params: 0 of 0",
        "  budget: 2.0000 GiB",
        "  baseline: 1.0000 GiB",
    ]
