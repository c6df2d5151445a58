"""The same record / check / unused lifecycle without xdist, with -n0 and with -n2.

Under xdist the table rows travel in ``user_properties`` and the unused entries in
``workeroutput``; the controller must print exactly what a plain run prints.
"""

from __future__ import annotations

import re

import pytest

from conftest import SMALL, output


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


THREE = f"""
import pytest

@pytest.mark.vram_budget(gb=1, {SMALL})
@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_m(vram, method):
    vram.step(method=method)
"""


def rows(result: pytest.RunResult) -> list[str]:
    return sorted(line.split()[0] for line in result.outlines if line.startswith("test_mem.py::"))


@pytest.mark.parametrize("mode", [[], ["-n0"], ["-n2"]], ids=["plain", "n0", "n2"])
def test_lifecycle_is_the_same_under_xdist(vram_project, mode: list[str]) -> None:
    vram_project.write(THREE)
    recorded = vram_project.record(*mode)
    recorded.stdout.fnmatch_lines(["vram baselines: 3 created, 0 updated, 0 unchanged, 0 unused"])
    expected = [f"test_mem.py::test_m[{m}]" for m in ("freeze", "full", "lora")]
    assert rows(recorded) == expected, output(recorded)

    checked = vram_project.run(*mode)
    checked.assert_outcomes(passed=3)
    assert rows(checked) == expected
    assert all(
        re.search(r"\+0\.0%\s+ok$", line)
        for line in checked.outlines
        if line.startswith("test_mem.py::")
    )

    vram_project.write(THREE.replace('"freeze", ', ""))
    stale = vram_project.run(*mode)
    stale.assert_outcomes(passed=2)
    stale.stdout.fnmatch_lines(
        [
            "1 unused vram baseline entries (remove with --vram-update):",
            "  baselines/host-cpu/test_mem.json: test_m[[]freeze[]] / tiny-llama freeze adamw bf16 b1 s32",
        ]
    )
    assert "test_m[freeze]" in vram_project.baseline()["entries"]  # kept until an update

    removed = vram_project.record(*mode)
    removed.stdout.fnmatch_lines(
        ["vram baselines: 0 created, 0 updated, 2 unchanged, 1 unused (removed)"]
    )
    assert set(vram_project.baseline()["entries"]) == {"test_m[full]", "test_m[lora]"}
