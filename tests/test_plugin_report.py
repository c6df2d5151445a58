"""--vram-json: the run as JSON for CI artifacts, and snapshots kept only for failing cases."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import LABEL, SMALL, output
from pytest_vram.result import Breakdown, MemoryResult

TESTS = f"""
import pytest

@pytest.mark.vram_budget(gb=1, {SMALL})
def test_fits(vram):
    vram.step()

@pytest.mark.vram_budget(gb=0.001, {SMALL})
def test_too_big(vram):
    vram.step()
"""


def test_json_report_holds_every_case_with_its_result(vram_project) -> None:
    vram_project.write(TESTS)
    result = vram_project.run("--vram-update", "--vram-json", "reports/vram.json")
    result.assert_outcomes(passed=1, failed=1)
    doc = json.loads((vram_project.path / "reports" / "vram.json").read_text())
    assert doc["schema"] == 1 and doc["errors"] == []
    cases = {c["test"].split("::")[1]: c for c in doc["cases"]}
    assert set(cases) == {"test_fits", "test_too_big"}
    fits, big = cases["test_fits"], cases["test_too_big"]
    assert not fits["failed"] and big["failed"]
    assert big["reasons"] and "exceeds budget" in big["reasons"][0]
    # The full result rides along: the same peak and breakdown as the table's row.
    r = MemoryResult.from_dict(fits["result"])
    assert r.label == LABEL and r.peak_bytes == fits["peak_bytes"] > 0
    assert r.breakdown.total_bytes == r.peak_bytes
    assert not list((vram_project.path / "reports").glob(".*.tmp"))  # written, then renamed


def test_json_report_under_xdist_has_the_workers_cases(vram_project) -> None:
    vram_project.write(TESTS)
    result = vram_project.run("--vram-update", "-n", "2", "--vram-json", "out.json")
    result.assert_outcomes(passed=1, failed=1)
    doc = json.loads((vram_project.path / "out.json").read_text())
    assert len(doc["cases"]) == 2, output(result)


def _result(snapshot: Path) -> MemoryResult:
    return MemoryResult(
        "case",
        "cuda",
        "nvidia-x-24gb",
        1,
        (1,),
        Breakdown(activation_bytes=1),
        snapshot_path=str(snapshot),
    )


def test_a_failing_case_keeps_its_snapshot_and_a_passing_one_drops_it(
    pytester, tmp_path: Path
) -> None:
    from pytest_vram.options import resolve
    from pytest_vram.session import VramSession

    config = pytester.parseconfig("--vram-json", str(tmp_path / "r" / "vram.json"))
    session = VramSession(config, resolve(config))
    passing, failing = tmp_path / "a.pickle", tmp_path / "b.pickle"
    passing.write_bytes(b"x")
    failing.write_bytes(b"y")
    assert session.keep_snapshot(_result(passing), failed=False) is None
    assert not passing.exists()
    kept = session.keep_snapshot(_result(failing), failed=True)
    assert kept == str(tmp_path / "r" / "snapshots" / "b.pickle")
    assert Path(kept).read_bytes() == b"y" and not failing.exists()
