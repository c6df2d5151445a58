"""Numbers where CI looks: junit XML properties, and github-action-benchmark's JSON."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from conftest import SMALL

MODULE = f"""
import pytest


def touch(n):
    return n


@pytest.mark.vram_budget(gb=1, {SMALL})
def test_one(vram):
    vram.step()


@pytest.mark.vram_budget(gb=0.5)
def test_two(vram):
    vram.measure(touch, 1)
    vram.measure(touch, 2)
"""


def test_junit_carries_each_cases_numbers_and_the_benchmark_file_each_peak(vram_project) -> None:
    vram_project.write(MODULE)
    vram_project.record()
    result = vram_project.run("--junitxml", "junit.xml", "--vram-benchmark-json", "bench/m.json")
    result.assert_outcomes(passed=2)
    cases = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(vram_project.path / "junit.xml").iter("testcase")
    }
    one, two = cases["test_one"], cases["test_two"]
    peak = int(one["vram_peak_bytes"])
    assert peak > 0 and one["vram_budget_bytes"] == str(2**30)
    assert one["vram_baseline_bytes"] == str(peak) and one["vram_verdict"] == "ok"
    assert one["vram_label"] == "tiny-llama full adamw bf16 b1 s32"
    # two cases in one test: each property names its case
    assert two["vram_peak_bytes[test_mem.touch(1)]"] == two["vram_peak_bytes[test_mem.touch(2)]"]
    assert two["vram_verdict[test_mem.touch(2)]"] == "ok"

    bench = json.loads((vram_project.path / "bench" / "m.json").read_text())
    assert [entry["name"] for entry in bench] == [
        "test_mem.py::test_one [tiny-llama full adamw bf16 b1 s32]",
        "test_mem.py::test_two [test_mem.touch(1)]",
        "test_mem.py::test_two [test_mem.touch(2)]",
    ]
    assert bench[0] == {
        "name": bench[0]["name"],
        "unit": "bytes",
        "value": peak,
        "extra": "verdict ok; meter host",
    }


def test_a_benchmark_file_that_cannot_be_written_fails_the_run_naming_it(vram_project) -> None:
    vram_project.write(MODULE)
    vram_project.record()
    (vram_project.path / "taken").write_text("a file, not a folder")
    result = vram_project.run("--vram-benchmark-json", "taken/m.json")
    assert result.ret == 1
    assert "--vram-benchmark-json: cannot write" in "\n".join(result.outlines + result.errlines)
