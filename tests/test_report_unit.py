"""``report.Summary`` and ``write_json`` on rows made by ``verdict.judge``: the terminal table's
columns and verdicts, the notes, counts and unused lines, and the JSON report file. No session;
the same summary through pytest is test_plugin_verdict.py and test_plugin_report.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pytest_vram.report import Summary, write_json
from pytest_vram.result import GIB, Breakdown, MemoryResult
from pytest_vram.verdict import Budget, judge

HEADER = ["test", "spec", "meter", "peak GiB", "budget", "baseline", "delta", "verdict"]


def result(label: str, peak: int, notes: tuple[str, ...] = ()) -> MemoryResult:
    return MemoryResult(
        label, "host", "host-cpu", peak, (peak,), Breakdown(activation_bytes=peak), notes=notes
    )


def row(
    test: str,
    peak: int,
    baseline: int | None,
    budget: int | None = None,
    *,
    update: bool = False,
    notes: tuple[str, ...] = (),
    label: str = "tiny-llama full adamw bf16 b1 s32",
) -> dict[str, Any]:
    base = None if baseline is None else result(label, baseline)
    verdict = judge(
        test,
        result(label, peak, notes),
        Budget(budget, 0.05),
        base,
        strict=False,
        update=update,
        record_hint="pytest-vram refresh",
    )
    return verdict.row()


def cells(line: str) -> list[str]:
    # Cells are joined by two spaces and padded; a label holds single spaces only.
    return re.split(r" {2,}", line.strip())


def test_table_columns_and_verdicts() -> None:
    rows = [
        row("test_ok", GIB, GIB, 2 * GIB),
        row("test_over[big]", 3 * GIB, 3 * GIB, 2 * GIB),
        row("test_up", 1100, 1000),
        row("test_new", GIB // 2, None),
        row("test_down", 900, 1000, label="qwen2.5-7b lora adamw bf16 b1 s128"),
    ]
    lines = list(Summary(rows=rows).lines())
    assert cells(lines[0]) == HEADER
    assert [cells(line) for line in lines[1:6]] == [
        ["test_ok", "tiny-llama full adamw bf16 b1 s32", "host"]
        + ["1.000", "2.000", "1.000", "+0.0%", "ok"],
        [
            "test_over[big]",
            "tiny-llama full adamw bf16 b1 s32",
            "host",
            "3.000",
            "2.000",
            "3.000",
            "+0.0%",
            "FAIL over-budget",
        ],
        # 1100 and 1000 bytes: as many decimals as tell them apart
        ["test_up", "tiny-llama full adamw bf16 b1 s32", "host", "0.0000010", "-", "0.0000009"]
        + ["+10.0%", "FAIL drift-up"],
        ["test_new", "tiny-llama full adamw bf16 b1 s32", "host", "0.500", "-", "-", "-"]
        + ["FAIL no-baseline"],
        ["test_down", "qwen2.5-7b lora adamw bf16 b1 s128", "host", "0.0000008", "-", "0.0000009"]
        + ["-10.0%", "drift-down"],
    ]
    # a drift down is not a failure, but its note is printed under the table
    assert lines[6].startswith("note: test_down: peak 900 B is -10.0% (-100 B) from baseline")
    assert len(lines) == 7


def test_numbers_that_differ_never_print_the_same() -> None:
    """A peak one byte over a 0.012 GiB budget read ``0.012  0.012``; so did a peak one byte
    over its baseline. The row's numbers get the decimals that tell them apart."""
    budget = int(0.012 * GIB)
    rows = [
        row("test_over", budget + 1, budget + 1, budget),
        row("test_up", budget + 1, budget),
        row("test_same", budget, budget, budget),
        row("test_gib", GIB, GIB),  # a size of 1 GiB: the table is in GiB
    ]
    over, up, same = (cells(line)[3:6] for line in list(Summary(rows=rows).lines())[1:4])
    assert over == ["0.012000000", "0.011999999", "0.012000000"]
    assert up == ["0.012000000", "-", "0.011999999"]
    assert same == ["0.012", "0.012", "0.012"]  # equal numbers keep three decimals
    # Below 1 GiB, the table is in MiB: 0.012 GiB is 12.288 MiB, a byte 0.000001 MiB
    header, over, up, same = list(Summary(rows=rows[:3]).lines())
    assert cells(header)[3] == "peak MiB"
    assert cells(over)[3:6] == ["12.288000", "12.287999", "12.288000"]
    assert cells(up)[3:6] == ["12.288000", "-", "12.287999"]
    assert cells(same)[3:6] == ["12.288", "12.288", "12.288"]


def test_text_columns_are_left_aligned_and_numbers_right_aligned() -> None:
    rows = [row("test_a", GIB, GIB, 20 * GIB), row("test_long_name", 15 * GIB, 15 * GIB, GIB)]
    header, *body = list(Summary(rows=rows).lines())
    starts = [header.index(name) for name in HEADER]
    for line in body:
        assert line[starts[1] - 2 : starts[1]] == "  "  # the test column is padded on the right
        assert line[starts[1] :].startswith("tiny-llama")
    # a number ends where its column's name ends
    for name, values in (("peak GiB", ("1.000", "15.000")), ("budget", ("20.000", "1.000"))):
        end = header.index(name) + len(name)
        for line, value in zip(body, values, strict=True):
            assert line[end - len(value) - 1 : end] == f" {value}", (name, line)
    assert body[0].endswith("ok") and body[1].endswith("FAIL over-budget")


def test_update_shows_the_action_and_the_counts() -> None:
    rows = [
        row("test_a", 1000, None, update=True),
        row("test_b", 1000, 1000, update=True),
        row("test_c", 1200, 1000, update=True),
        row("test_d", 3 * GIB, 3 * GIB, GIB, update=True),
    ]
    summary = Summary(rows=rows, update=True, unused=["b/test_x.json: test_gone / case"])
    lines = list(summary.lines())
    assert [cells(line)[-1] for line in lines[1:5]] == [
        "created",
        "unchanged",
        "updated",
        "FAIL unchanged",  # recorded, and over its budget all the same
    ]
    assert summary.count_line() == "1 created, 1 updated, 2 unchanged, 1 unused (removed)"
    assert lines[5:] == [
        "vram baselines: 1 created, 1 updated, 2 unchanged, 1 unused (removed)",
        "1 unused vram baseline entries (removed by this update):",
        "  b/test_x.json: test_gone / case",
    ]


def test_unused_entries_are_listed_sorted_with_how_to_remove_them() -> None:
    unused = ["b.json: test_z / case", "a.json: test_y / case", "a.json: test_x / case"]
    summary = Summary(unused=list(unused))
    assert list(summary.lines()) == [
        "3 unused vram baseline entries (remove with --vram-update):",
        "  a.json: test_x / case",
        "  a.json: test_y / case",
        "  b.json: test_z / case",
    ]
    assert summary.count_line() == "0 created, 0 updated, 0 unchanged, 3 unused"


def test_nothing_measured_prints_nothing() -> None:
    assert list(Summary().lines()) == []
    assert list(Summary(update=True).lines()) == [
        "vram baselines: 0 created, 0 updated, 0 unchanged, 0 unused"
    ]


def test_a_baseline_of_zero_bytes_has_no_delta() -> None:
    (_, line) = Summary(rows=[row("test_zero", 10, 0)]).lines()
    assert cells(line)[6] == "-"


def test_every_notes_line_names_its_test() -> None:
    rows = [row("test_a", 1000, 1000, notes=("one", "two")), row("test_b", 1000, 1000)]
    lines = list(Summary(rows=rows).lines())
    assert lines[3:] == ["note: test_a: one", "note: test_a: two"]


def test_a_note_shared_by_many_cases_is_printed_once_naming_them() -> None:
    shared = "simulated ZeRO-3 layout over 8 ranks: ..."
    rows = [row(f"test_{i}", 1000, 1000, notes=(shared,)) for i in range(5)]
    rows.append(row("test_own", 1000, 1000, notes=("only here",)))
    notes = [line for line in Summary(rows=rows).lines() if line.startswith("note")]
    assert notes == [
        f"note (5 tests: test_0, test_1, test_2 and 2 more): {shared}",
        "note: test_own: only here",
    ]


def test_json_report_holds_the_rows_counts_unused_and_errors(tmp_path: Path) -> None:
    rows = [row("test_a", 1000, None, update=True), row("test_b", 2000, 1000, update=True)]
    summary = Summary(rows=rows, update=True, unused=["x.json: test_gone / case"])
    path = tmp_path / "reports" / "deep" / "vram.json"
    write_json(path, summary, ["baseline file x.json cannot be read"])
    text = path.read_text()
    data = json.loads(text)
    assert data == {
        "schema": 1,
        "cases": rows,
        "counts": {"created": 1, "updated": 1, "unused": 1},
        "unused": ["x.json: test_gone / case"],
        "errors": ["baseline file x.json cannot be read"],
    }
    assert text == json.dumps(data, indent=1, sort_keys=True) + "\n"
    assert MemoryResult.from_dict(data["cases"][1]["result"]).peak_bytes == 2000
    assert [p.name for p in path.parent.iterdir()] == ["vram.json"]  # no temporary file left


def test_json_report_replaces_the_previous_one_whole(tmp_path: Path) -> None:
    path = tmp_path / "vram.json"
    path.write_text("not json: a report of an earlier run")
    write_json(path, Summary(), [])
    assert json.loads(path.read_text()) == {
        "schema": 1,
        "cases": [],
        "counts": {"unused": 0},
        "unused": [],
        "errors": [],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["vram.json"]
