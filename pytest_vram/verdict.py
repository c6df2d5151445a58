"""Verdict of one measured case: budget, then baseline. Pure functions of plain values."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final, Literal, final

from pytest_vram import calibration, explain
from pytest_vram.result import GIB, MemoryResult, gib
from pytest_vram.units import format_bytes, format_pair

__all__ = ["Budget", "CaseVerdict", "judge", "versions_changed"]

Status = Literal[
    "ok",
    "over-capacity",
    "over-budget",
    "leak",
    "drift-up",
    "drift-down",
    "no-baseline",
    "recorded",
    "prediction-off",
]
BaselineAction = Literal["created", "updated", "unchanged"]
_VERSION_KEYS: Final = ("python", "torch", "transformers", "peft", "pytest-vram")


@final
@dataclasses.dataclass(frozen=True)
class Budget:
    bytes: int | None  # None: no ceiling, baseline only
    tolerance: float
    # Steady steps (2, 3, ...) must not grow: growth means something is kept across steps.
    leak_tolerance: float = 0.0

    @classmethod
    def from_gib(cls, gb: float | None, tolerance: float, leak_tolerance: float = 0.0) -> Budget:
        return cls(None if gb is None else int(gb * GIB), tolerance, leak_tolerance)


def versions_changed(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    keys = sorted(set(old) | set(new), key=lambda k: ((_VERSION_KEYS + (k,)).index(k), k))
    return [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys if old.get(k) != new.get(k)]


@final
@dataclasses.dataclass(frozen=True)
class CaseVerdict:
    test: str
    result: MemoryResult
    budget: Budget
    baseline: MemoryResult | None
    statuses: tuple[Status, ...]
    reasons: tuple[str, ...]  # one line each
    notes: tuple[str, ...]  # reported, not failing
    failed: bool
    action: BaselineAction | None = None
    # Printed under the reasons: what the peak is made of, what moved (``explain``).
    details: tuple[str, ...] = ()

    def section(self) -> str:
        """Breakdown at the peak, for the test report."""
        r = self.result
        lines = [f"{r.label}  (meter {r.meter}, device {r.device})"]
        width = max(len(name) for name, _ in r.breakdown.rows())
        for name, nbytes in (*r.breakdown.rows(), ("peak", r.peak_bytes)):
            lines.append(f"  {name:<{width}}  {gib(nbytes):10.4f} GiB  {nbytes:>16,d} B")
        steps = ", ".join(f"{gib(b):.4f}" for b in r.step_peak_bytes)
        lines.append(f"  per-step peaks (GiB): {steps}")
        if r.peak_source != "storage":
            lines.append(f"  the budget checks: {r.peak_source}")
        lines.extend(f"  {name}: {gib(nbytes):.4f} GiB" for name, nbytes in r.device_counts())
        error = calibration.error_of(r.prediction, r.peak_source, r.peak_bytes)
        if error is not None:
            lines.append(f"  prediction: {error.line()}")
        elif r.prediction is not None and r.prediction.unsupported:
            lines.append(f"  prediction: none, {r.prediction.unsupported}")
        for rank, rr in enumerate(r.ranks):
            lines.append(
                f"  rank {rank}: peak {gib(rr.peak_bytes):.4f} GiB, "
                f"host offload {gib(rr.host_offload_bytes):.4f} GiB"
            )
        if r.host_offload_bytes:
            lines.append(f"  offloaded to host (all ranks): {gib(r.host_offload_bytes):.4f} GiB")
        lines.append(f"  trainable params: {r.trainable_params:,d} of {r.total_params:,d}")
        if self.budget.bytes is not None:
            lines.append(f"  budget: {gib(self.budget.bytes):.4f} GiB")
        if self.baseline is not None:
            lines.append(f"  baseline: {gib(self.baseline.peak_bytes):.4f} GiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def row(self) -> dict[str, Any]:
        """Plain data for the terminal table; travels from xdist workers in user_properties."""
        return {
            "test": self.test,
            "label": self.result.label,
            "peak_bytes": self.result.peak_bytes,
            "budget_bytes": self.budget.bytes,
            "baseline_bytes": self.baseline.peak_bytes if self.baseline else None,
            "status": ",".join(self.statuses),
            "failed": self.failed,
            "action": self.action,
            "notes": list(self.notes),
            "reasons": list(self.reasons),
            "details": list(self.details),
            "result": self.result.to_dict(),
        }


def _leak(result: MemoryResult, tolerance: float) -> str | None:
    """Step 1 creates the optimizer state; from step 2 on every step should peak the same."""
    peaks = result.step_peak_bytes
    for step in range(2, len(peaks)):  # 1-based: compare step `step` with step `step + 1`
        before, after = peaks[step - 1], peaks[step]
        if before and after > before * (1 + tolerance):
            shown_before, shown_after = format_pair(before, after)
            return (
                f"peak grew from {shown_before} at step {step} to {shown_after} at "
                f"step {step + 1} ({after / before - 1:+.2%}, {after - before:+,d} B) beyond leak "
                f"tolerance {tolerance:.1%}: something is kept across steps"
            )
    return None


def judge(
    test: str,
    result: MemoryResult,
    budget: Budget,
    baseline: MemoryResult | None,
    *,
    strict: bool,
    update: bool,
    record_hint: str,
    capacity_bytes: int | None = None,
    stored: Mapping[str, int] | None = None,
    calibrate: float | None = None,
) -> CaseVerdict:
    """``stored``: the peaks of the test's other baseline entries, by label, shown when this
    case has none (a changed case reads as "no baseline" otherwise). ``calibrate``: the largest
    prediction error allowed (``--vram-calibrate``)."""
    statuses: list[Status] = []
    reasons: list[str] = []
    notes: list[str] = []
    details: list[str] = []
    tag = f"[{result.label}]"
    peak = result.peak_bytes
    notes.extend(result.notes)
    if capacity_bytes is not None and peak > capacity_bytes:
        statuses.append("over-capacity")
        shown_peak, shown_capacity = format_pair(peak, capacity_bytes)
        reasons.append(
            f"out of memory predicted: peak {shown_peak} exceeds the device's "
            f"{shown_capacity} by {format_bytes(peak - capacity_bytes)} "
            f"({peak / capacity_bytes - 1:+.1%}) {tag}"
        )
    if budget.bytes is not None and peak > budget.bytes:
        statuses.append("over-budget")
        over = peak / budget.bytes - 1
        shown_peak, shown_budget = format_pair(peak, budget.bytes)
        reasons.append(f"peak {shown_peak} exceeds budget {shown_budget} ({over:+.1%}) {tag}")
    leak = _leak(result, budget.leak_tolerance)
    if leak:
        statuses.append("leak")
        reasons.append(f"{leak} {tag}")
    if statuses:  # over capacity or budget, or a leak: what the peak holds
        details.extend(explain.made_of(result))
    error = calibration.error_of(result.prediction, result.peak_source, peak)
    if calibrate is not None and error is not None and abs(error.fraction) > calibrate:
        statuses.append("prediction-off")
        reasons.append(f"{error.line()}, beyond --vram-calibrate {calibrate:.1%} {tag}")
    action: BaselineAction | None = None
    if update:
        statuses.append("recorded")
        if baseline is None:
            action = "created"
        else:
            action = (
                "unchanged" if baseline.baseline_dict() == result.baseline_dict() else "updated"
            )
    elif baseline is None:
        statuses.append("no-baseline")
        reasons.append(
            f"no baseline for {tag} on device {result.device}; record it with: {record_hint}"
        )
        others = {k: v for k, v in (stored or {}).items() if k != result.label}
        if others:
            details.append("  this test's stored cases (is this one of them, changed?):")
            details.extend(
                f"    [{label}]: {format_bytes(peak)}" for label, peak in sorted(others.items())
            )
    elif baseline.peak_bytes != peak:
        drift = explain.drift(baseline.peak_bytes, peak)
        if abs(drift) > budget.tolerance:
            changed = versions_changed(baseline.versions, result.versions)
            why = (
                "versions changed since the baseline: " + ", ".join(changed)
                if changed
                else ("no library version changed since the baseline")
            )
            if baseline.environment:  # recorded before the field existed: nothing to compare
                moved = versions_changed(baseline.environment, result.environment)
                why += "; " + (
                    "environment changed: " + ", ".join(moved)
                    if moved
                    else "the recorded environment is the same"
                )
            shown_peak, shown_base = format_pair(peak, baseline.peak_bytes)
            delta = format_bytes(peak - baseline.peak_bytes, sign=True)
            line = (
                f"peak {shown_peak} is {drift:+.1%} ({delta}) "
                f"from baseline {shown_base}, beyond tolerance "
                f"{budget.tolerance:.1%} {tag}; {why}"
            )
            if drift > 0:
                statuses.append("drift-up")
                reasons.append(line)
                details.extend(explain.moved(baseline, result, budget.tolerance))
            else:
                statuses.append("drift-down")
                line += f"; tighten the baseline with: {record_hint}"
                (reasons if strict else notes).append(line)
                if strict:
                    details.extend(explain.moved(baseline, result, budget.tolerance))
    if not statuses:
        statuses.append("ok")
    return CaseVerdict(
        test=test,
        result=result,
        budget=budget,
        baseline=baseline,
        statuses=tuple(statuses),
        reasons=tuple(reasons),
        notes=tuple(notes),
        failed=bool(reasons),
        action=action,
        details=tuple(details) if reasons else (),
    )
