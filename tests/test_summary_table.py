"""The terminal table fits the terminal: ``Summary.lines(width)`` shortens test ids and specs
(never numbers or verdicts) and keeps rows apart, wraps long notes; the meter column; the width
pytest reports (``Summary.terminal_width``); one end-to-end run through pytest."""

from __future__ import annotations

import re
import types
from typing import Any

import pytest

from conftest import SMALL, output
from pytest_vram.report import Summary
from pytest_vram.result import GIB, Breakdown, MemoryResult
from pytest_vram.units import column_unit, format_gib, format_in
from pytest_vram.verdict import Budget, judge

MIB = 2**20
CUT = "\u2026"


def row(
    test: str,
    label: str,
    peak: int = 61 * MIB,
    baseline: int | None = 61 * MIB,
    budget: int | None = GIB // 4,
    *,
    meter: str = "host",
    device: str = "host-cpu",
    notes: tuple[str, ...] = (),
) -> dict[str, Any]:
    def result(nbytes: int) -> MemoryResult:
        return MemoryResult(
            label, meter, device, nbytes, (nbytes,), Breakdown(activation_bytes=nbytes), notes=notes
        )

    base = None if baseline is None else result(baseline)
    verdict = judge(
        test, result(peak), Budget(budget, 0.05), base, strict=False, update=False, record_hint="x"
    )
    return verdict.row()


def cells(line: str) -> list[str]:
    # Cells are joined by two spaces and padded; a label or a meter holds single spaces only.
    return re.split(r" {2,}", line.strip())


def table(summary: Summary, width: int | None) -> list[list[str]]:
    lines = [line for line in summary.lines(width) if not line.startswith(("note", " "))]
    return [cells(line) for line in lines]


def from_original(shown: str, original: str) -> bool:
    """``shown`` is ``original`` with parts left out (marked ``…``, but for the module of a
    test id): the rest of it, a word or part of one at a time, is found in it in order."""
    if shown == original or original.endswith(("::" + shown, "/" + shown)):
        return True
    at = 0
    for piece in shown.replace(CUT, " ").split():
        at = original.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return CUT in shown


# The shipped suites' ids and specs: suites/test_zero.py on the host meter, two ranks...
ZERO = [
    row(f"suites/test_zero.py::test_zero_step[zero{z}-{o}]", f"tiny-llama full adamw {rest}")
    for z, o, rest in (
        (0, "none", "bf16 b2 s64 zero0 r2"),
        (1, "none", "bf16 b2 s64 zero1 r2"),
        (1, "optimizer", "bf16 b2 s64 zero1 offload-optimizer r2"),
        (2, "none", "bf16 b2 s64 zero2 r2"),
        (2, "optimizer", "bf16 b2 s64 zero2 offload-optimizer r2"),
    )
] + [
    row("suites/test_zero.py::test_offload_does_not_raise_device_memory", label)
    for zero in (1, 2, 3)
    for label in (
        f"tiny-llama full adamw bf16 b2 s64 zero{zero} offload-optimizer r2",
        f"tiny-llama full adamw bf16 b2 s64 zero{zero} r2",
    )
]
# ... and suites/test_references.py's predictions on the fake meter, 32B models beside them.
DEEPSEEK = "deepseek-r1-distill-qwen-1.5b"
REFERENCES = (
    [
        row(
            f"suites/test_references.py::test_llama_factory_8_gpu_orderings_hold_on_every_rank[{m}]",
            f"{m} {method} adamw bf16 b{b} s1024 ckpt zero3{off} r8",
            peak=int(gib * GIB),
            baseline=int(gib * GIB),
            budget=200 * GIB,
            meter="fake",
            device="fake",
        )
        for m in (DEEPSEEK, "qwen2.5-32b")
        for method, b, off, gib in (
            ("full", 2, "", 85.185),
            ("freeze", 2, "", 15.892),
            ("qlora", 2, "", 10.268),
            ("qlora", 2, " offload-both", 7.932),
            ("qlora", 1, " offload-both", 4.923),
        )
    ]
    + [
        row(
            "suites/test_references.py::test_lomo_table_1_totals_with_activation_checkpointing",
            label,
            peak=int(gib * GIB),
            baseline=int(gib * GIB),
            budget=200 * GIB,
            meter="fake",
            device="fake",
        )
        for label, gib in (
            ("llama-7b full lomo fp16 b8 s512 ckpt eager", 15.145),
            ("llama-7b full adamw fp16 b1 s16", 50.693),
            ("llama-7b full sgd fp16 b1 s16 zero0 r1", 75.398),
            ("llama-7b full adamw fp16 b1 s16 zero0 r1", 125.603),
        )
    ]
    + [  # two tests that differ in the middle of their names, with the same spec
        row(
            f"suites/test_references.py::test_lomo_table_1_activations_{how}_checkpointing",
            "llama-7b full lomo fp16 b8 s512 ckpt eager",
            meter="fake",
            device="fake",
        )
        for how in ("with", "without")
    ]
)


@pytest.mark.parametrize("rows", [ZERO, REFERENCES, ZERO + REFERENCES], ids=["zero", "refs", "all"])
@pytest.mark.parametrize("width", [80, 120])
def test_a_wide_table_fits_with_every_row_apart_and_its_numbers_whole(
    rows: list[dict[str, Any]], width: int
) -> None:
    summary = Summary(rows=rows)
    whole = table(summary, None)
    assert max(len(line) for line in summary.lines()) > width  # it did not fit
    lines = [line for line in summary.lines(width) if not line.startswith(("note", " "))]
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    fitted = [cells(line) for line in lines]
    assert fitted[0] == whole[0]  # the header
    pairs = set()
    for shown, full in zip(fitted[1:], whole[1:], strict=True):
        assert shown[2:] == full[2:]  # meter, numbers, delta and verdict untouched
        assert from_original(shown[0], full[0]) and from_original(shown[1], full[1])
        pairs.add((shown[0], shown[1]))
    assert len(pairs) == len(rows)  # every row still tells its case from the others


def test_shortening_drops_the_shared_module_first() -> None:
    rows = [row(f"suites/test_zero.py::test_zero_step[zero{z}-none]", "a b c") for z in range(3)]
    full = Summary(rows=rows)
    width = max(len(line) for line in full.lines()) - 1
    assert [r[0] for r in table(full, width)[1:]] == [
        f"test_zero_step[zero{z}-none]" for z in range(3)
    ]
    # Two modules: only the directory they share is dropped.
    rows.append(row("suites/test_matrix.py::test_step[full-adamw-bf16]", "a b c"))
    shown = [r[0] for r in table(Summary(rows=rows), width)[1:]]
    assert shown[0] == "test_zero.py::test_zero_step[zero0-none]"
    assert shown[3] == "test_matrix.py::test_step[full-adamw-bf16]"


def test_specs_that_differ_only_in_the_middle_stay_apart() -> None:
    labels = [f"tiny-llama full adamw bf16 b2 s64 zero{z} offload-optimizer r2" for z in (1, 2, 3)]
    rows = [row("t.py::test_offload", label) for label in labels]
    specs = [r[1] for r in table(Summary(rows=rows), 60)[1:]]
    assert len(set(specs)) == 3 and all(CUT in spec for spec in specs), specs
    assert all(from_original(s, label) for s, label in zip(specs, labels, strict=True))


def test_a_table_that_fits_is_unchanged() -> None:
    rows = [row("test_mem.py::test_a", "tiny-llama full adamw bf16 b1 s32"), *ZERO[:2]]
    summary = Summary(rows=rows)
    whole = list(summary.lines())
    exact = max(len(line) for line in whole)
    assert list(summary.lines(exact)) == whole
    assert list(summary.lines(1000)) == whole
    assert CUT not in "".join(summary.lines(exact)) and CUT in "".join(summary.lines(exact - 1))


@pytest.mark.parametrize("width", [40, 20, 1])
def test_a_narrow_terminal_never_drops_a_verdict_or_a_number(width: int) -> None:
    rows = [*ZERO, row("t.py::test_over", "x", peak=GIB // 2, baseline=None)]
    summary = Summary(rows=rows)
    whole = table(summary, None)
    fitted = table(summary, width)
    assert [r[2:] for r in fitted] == [r[2:] for r in whole]
    assert fitted[-1][-1] == "FAIL over-budget,no-baseline"
    assert all(len(r[0]) >= 4 and len(r[1]) >= 1 for r in fitted)  # as wide as "test" at least


def test_the_meter_column_shows_fake_predictions_beside_host_measurements() -> None:
    rows = [
        row("t.py::test_host", "tiny-llama full adamw bf16 b1 s32"),
        row("t.py::test_32b", "qwen2.5-32b full adamw bf16 b1 s32", meter="fake", device="fake"),
        row("t.py::test_gpu", "x", meter="cuda", device="nvidia-h100-80gb-hbm3"),
        row("t.py::test_rtx", "x", meter="cuda", device="nvidia-geforce-rtx-4090-24gb"),
        row("t.py::test_odd", "x", meter="cuda", device="nvidia-some-board"),
    ]
    header, *body = table(Summary(rows=rows), None)
    assert header[2] == "meter"
    assert [r[2] for r in body] == [
        "host",
        "fake",
        "cuda h100-80gb",
        "cuda rtx-4090-24gb",
        "cuda some-board",
    ]


def test_one_unit_for_the_sizes_named_in_the_header() -> None:
    small = [row("t.py::test_a", "a", peak=20 * MIB + 512 * 1024, baseline=20 * MIB)]
    header, body = table(Summary(rows=small), None)
    assert header[3] == "peak MiB" and body[3:6] == ["20.500", "256.000", "20.000"]
    # a row of GiB in the table: every size in GiB, the MiB ones with the decimals they need
    big = [*small, row("t.py::test_b", "b", peak=85 * GIB, baseline=85 * GIB, budget=None)]
    header, first, second = table(Summary(rows=big), None)
    assert header[3] == "peak GiB"
    assert first[3:6] == ["0.0200", "0.2500", "0.0195"]  # as many decimals as tell them apart
    assert second[3:6] == ["85.000", "-", "85.000"]


def test_sizes_in_one_unit_with_the_decimals_that_tell_them_apart() -> None:
    assert column_unit([None, 5 * MIB, 1023 * MIB]) == "MiB"
    assert column_unit([None, 5 * MIB, GIB]) == "GiB"
    assert format_in([GIB, None], "MiB") == ["1024.000", "-"]
    assert format_in([20 * MIB + 1, 20 * MIB], "MiB") == ["20.000001", "20.000000"]
    assert format_in([GIB, GIB // 4], "GiB") == format_gib([GIB, GIB // 4]) == ["1.000", "0.250"]


def test_a_long_note_wraps_with_an_indent_and_keeps_every_word() -> None:
    note = "simulated ZeRO-3 layout over 8 ranks: " + "parameters and gradients as laid out " * 6
    long_id = "suites/test_references.py::test_llama_factory_8_gpu_orderings_hold_on_every_rank"
    rows = [row(f"{long_id}[{m}]", "a", notes=(note.strip(),)) for m in ("x", "y")]
    summary = Summary(rows=rows)
    (line,) = [line for line in summary.lines() if line.startswith("note")]
    wrapped = [line for line in summary.lines(80) if line.startswith(("note", " "))]
    assert len(wrapped) > 2 and wrapped[0] == "note (2 tests:"
    assert all(w.startswith("    ") for w in wrapped[1:])
    # a test id longer than the width is kept whole on its own line; the others fit
    assert all(len(w) <= 80 or long_id in w for w in wrapped)
    assert " ".join(w.strip() for w in wrapped) == line
    assert list(summary.lines(len(line))) == list(summary.lines())


# -- the width pytest reports -------------------------------------------------------------


def config(verbose: int = 0, fullwidth: int = 80) -> Any:
    writer = types.SimpleNamespace(fullwidth=fullwidth)
    return types.SimpleNamespace(
        getoption=lambda name, default=None: {"verbose": verbose}.get(name, default),
        get_terminal_writer=lambda: writer,
    )


@pytest.mark.parametrize(
    ("env", "verbose", "expected"),
    [
        ({}, 0, 97),
        ({}, 1, 97),
        ({}, 2, None),  # -vv: everything whole, as pytest's short summary
        ({"CI": "true"}, 0, None),  # a CI log is read in a browser: as pytest, no trimming
        ({"BUILD_NUMBER": "12"}, 0, None),
        ({"CI": ""}, 0, 97),  # empty: not set
        ({"CI": "true", "COLUMNS": "97"}, 0, 97),  # a width asked for counts on CI too
    ],
)
def test_terminal_width_is_pytests_but_none_on_ci_and_with_vv(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], verbose: int, expected: int | None
) -> None:
    for name in ("CI", "BUILD_NUMBER", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Summary.terminal_width(config(verbose, fullwidth=97)) == expected


LONG_TESTS = """
    import pytest

    @pytest.mark.parametrize("case", ["a_first_rather_long_parameter_id", "a_second_one"])
    @pytest.mark.vram_budget(gb=0.25)
    def test_a_test_name_long_enough_to_need_shortening_in_eighty_columns(vram, case):
        vram.step({small}, grad_ckpt=case == "a_second_one")
"""


def test_the_summary_fits_columns_through_pytest(
    vram_project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    vram_project.write(LONG_TESTS.format(small=SMALL))
    monkeypatch.setenv("COLUMNS", "250")
    wide = vram_project.record()
    monkeypatch.setenv("COLUMNS", "80")
    narrow = vram_project.run()
    narrow.assert_outcomes(passed=2)

    def rows(result: pytest.RunResult) -> list[str]:
        start = result.outlines.index(next(li for li in result.outlines if "= vram =" in li))
        return [li for li in result.outlines[start + 1 :] if li.startswith(("test", "spec"))][:3]

    header, *full = rows(wide)
    assert header.split() == ["test", "spec", "meter", "peak", "MiB", "budget"] + [
        "baseline",
        "delta",
        "verdict",
    ]
    assert all(line.startswith("test_mem.py::test_a_test_name_long") for line in full), output(wide)
    assert [cells(line)[2] for line in full] == ["host", "host"]
    _, *fitted = rows(narrow)
    assert all(len(line) <= 80 for line in fitted), output(narrow)
    assert len({tuple(cells(line)[:2]) for line in fitted}) == 2
    assert [cells(line)[-1] for line in fitted] == ["ok", "ok"]
    assert all(CUT in cells(line)[0] for line in fitted)
