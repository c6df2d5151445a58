"""The same record / check / unused lifecycle without xdist, with -n0 and with -n2.

Under xdist the table rows travel in ``user_properties`` and the unused entries in
``workeroutput``; the controller must print exactly what a plain run prints, and the workers'
baseline writes merge into one file.
"""

from __future__ import annotations

import re

import pytest

from conftest import LABEL, SMALL, output


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


# Four cases: under -n2 each worker gets some, so both write the one baseline file.
FOUR = f"""
import pytest

@pytest.mark.vram_budget(gb=1, {SMALL})
@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_m(vram, method):
    vram.step(method=method)

@pytest.mark.vram_budget(gb=0.25)
def test_q(vram):
    vram.step({SMALL}, optimizer="sgd")
"""
ROWS = [f"test_mem.py::test_m[{m}]" for m in ("freeze", "full", "lora")] + ["test_mem.py::test_q"]


def table_lines(result: pytest.RunResult) -> list[str]:
    """The vram table's rows (-v under xdist also prints each node id alone on a line)."""
    return [
        line
        for line in result.outlines
        if line.startswith("test_mem.py::") and len(line.split()) > 1
    ]


def rows(result: pytest.RunResult) -> list[str]:
    return sorted(line.split()[0] for line in table_lines(result))


@pytest.mark.parametrize("mode", [[], ["-n0"], ["-n2"]], ids=["plain", "n0", "n2"])
def test_lifecycle_is_the_same_under_xdist(vram_project, mode: list[str]) -> None:
    vram_project.write(FOUR)
    # -v under xdist names the worker that ran each test (its lines start with "[gw").
    verbose = ["-v"] if mode == ["-n2"] else []
    recorded = vram_project.record(*mode, *verbose)
    recorded.assert_outcomes(passed=4)
    recorded.stdout.fnmatch_lines(["vram baselines: 4 created, 0 updated, 0 unchanged, 0 unused"])
    assert rows(recorded) == ROWS, output(recorded)
    if verbose:
        # both workers recorded cases, so both wrote (merged into) the same file
        recorded.stdout.fnmatch_lines(["[[]gw0]*PASSED test_mem.py::*"])
        recorded.stdout.fnmatch_lines(["[[]gw1]*PASSED test_mem.py::*"])
    entries = vram_project.baseline()["entries"]
    assert set(entries) == {"test_m[full]", "test_m[freeze]", "test_m[lora]", "test_q"}
    assert list(entries["test_q"]) == [LABEL.replace(" adamw ", " sgd ")]

    # Checked against the baselines with one test gone: the others are ok, its entry unused.
    vram_project.write(FOUR.replace('"freeze", ', ""))
    checked = vram_project.run(*mode)
    checked.assert_outcomes(passed=3)
    assert checked.ret == 0
    assert rows(checked) == [r for r in ROWS if "freeze" not in r]
    assert all(re.search(r"\+0\.0%\s+ok$", line) for line in table_lines(checked))
    checked.stdout.fnmatch_lines(
        [
            "1 unused vram baseline entries (remove with --vram-update):",
            "  baselines/host-cpu/test_mem.json: test_m[[]freeze[]] / tiny-llama freeze adamw bf16 b1 s32",
        ]
    )
    assert "test_m[freeze]" in vram_project.baseline()["entries"]  # kept until an update

    removed = vram_project.record(*mode)
    removed.stdout.fnmatch_lines(
        ["vram baselines: 0 created, 0 updated, 3 unchanged, 1 unused (removed)"]
    )
    assert set(vram_project.baseline()["entries"]) == {"test_m[full]", "test_m[lora]", "test_q"}
