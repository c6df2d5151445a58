"""The terminal summary: a pure object whose ``lines()`` yields text (never raises into pytest)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, final

from pytest_vram.units import format_gib

__all__ = ["Summary", "benchmark_entries", "junit_properties", "write_benchmark_json", "write_json"]


def _delta(row: dict[str, Any]) -> str:
    base = row["baseline_bytes"]
    if not base:
        return "-"
    return f"{row['peak_bytes'] / base - 1:+.1%}"


@final
@dataclasses.dataclass
class Summary:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)  # "path: test / label"
    update: bool = False

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter(r["action"] for r in self.rows if r["action"])
        counts["unused"] = len(self.unused)
        return counts

    def count_line(self) -> str:
        c = self.counts()
        unused = f"{c['unused']} unused" + (" (removed)" if self.update and c["unused"] else "")
        return (
            f"{c['created']} created, {c['updated']} updated, {c['unchanged']} unchanged, {unused}"
        )

    def lines(self) -> Iterator[str]:
        if self.rows:
            yield from _table(self.rows)
        yield from _notes(self.rows)
        if self.update:
            yield f"vram baselines: {self.count_line()}"
        if self.unused:
            hint = "removed by this update" if self.update else "remove with --vram-update"
            yield f"{len(self.unused)} unused vram baseline entries ({hint}):"
            yield from (f"  {u}" for u in sorted(self.unused))  # xdist merges in any order


_NAMED_CASES = 3  # a note shared by more cases names this many, then counts the rest


def _notes(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    """Each note once, with the cases it applies to (a simulation's note is on every ZeRO case
    of the fake meter: it was printed once per case)."""
    cases: dict[str, list[str]] = {}
    for row in rows:
        for note in row["notes"]:
            where = cases.setdefault(note, [])
            if row["test"] not in where:
                where.append(row["test"])
    for note, tests in cases.items():
        if len(tests) == 1:
            yield f"note: {tests[0]}: {note}"
            continue
        named = ", ".join(tests[:_NAMED_CASES])
        more = len(tests) - _NAMED_CASES
        rest = f" and {more} more" if more > 0 else ""
        yield f"note ({len(tests)} tests: {named}{rest}): {note}"


def _table(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    header = ("test", "spec", "peak GiB", "budget", "baseline", "delta", "verdict")
    body = [
        (
            r["test"],
            r["label"],
            # three decimals, or as many more as tell apart the row's numbers that differ
            *format_gib((r["peak_bytes"], r["budget_bytes"], r["baseline_bytes"])),
            _delta(r),
            ("FAIL " if r["failed"] else "") + (r["action"] or r["status"]),
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    numeric = {2, 3, 4, 5}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    yield fmt(header)
    for cells in body:
        yield fmt(cells)


def write_json(path: Path, summary: Summary, errors: Sequence[str]) -> None:
    """The run as JSON for CI artifacts: every case's row with its full result. Written to a
    temporary file and renamed, so a reader never sees half a report."""
    data = {
        "schema": 1,
        "cases": summary.rows,
        "counts": dict(summary.counts()),
        "unused": summary.unused,
        "errors": list(errors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def junit_properties(row: dict[str, Any], suffix: str = "") -> list[tuple[str, object]]:
    """A case's numbers as junit XML properties (``vram_peak_bytes``, ...), so a CI dashboard
    that reads junit shows them; ``suffix`` tells a test's cases apart (``[label]``)."""
    props: list[tuple[str, object]] = [
        ("vram_label", row["label"]),
        ("vram_peak_bytes", row["peak_bytes"]),
    ]
    for key in ("budget_bytes", "baseline_bytes"):
        if row[key] is not None:
            props.append((f"vram_{key}", row[key]))
    props.append(("vram_verdict", row["status"]))
    return [(f"{name}{suffix}", value) for name, value in props]


def benchmark_entries(summary: Summary) -> list[dict[str, Any]]:
    """github-action-benchmark's "customSmallerIsBetter": one entry per case, in bytes."""
    return [
        {
            "name": f"{row['test']} [{row['label']}]",
            "unit": "bytes",
            "value": row["peak_bytes"],
            "extra": f"verdict {row['status']}; meter {row['result']['meter']}",
        }
        for row in summary.rows
    ]


def write_benchmark_json(path: Path, summary: Summary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(benchmark_entries(summary), indent=1) + "\n")
    os.replace(tmp, path)
