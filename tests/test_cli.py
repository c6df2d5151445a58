"""``pytest-vram refresh``: records baselines through pytest and prints the counts."""

from __future__ import annotations

import json
import sys

import pytest

MODULE = """
import pytest

@pytest.mark.vram_budget(gb=0.5, model="tiny-llama", batch=1, seq=32)
def test_full(vram):
    vram.step()

@pytest.mark.vram_budget(gb=0.5, model="tiny-llama", batch=1, seq=32)
def test_lora(vram):
    vram.step(method="lora")
"""


def refresh(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.run(
        sys.executable, "-m", "pytest_vram.cli", "refresh", "-p", "no:cacheprovider", *args
    )


def test_refresh_creates_then_reports_unchanged_then_unused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cases=MODULE)
    first = refresh(pytester)
    assert first.ret == 0
    first.stdout.fnmatch_lines(["pytest-vram refresh: 2 created, 0 updated, 0 unchanged, 0 unused"])
    path = pytester.path / "baselines" / "host-cpu" / "test_cases.json"
    recorded = path.read_text()
    assert set(json.loads(recorded)["entries"]) == {"test_full", "test_lora"}

    second = refresh(pytester)
    second.stdout.fnmatch_lines(
        ["pytest-vram refresh: 0 created, 0 updated, 2 unchanged, 0 unused"]
    )
    assert path.read_text() == recorded  # byte for byte

    pytester.makepyfile(
        test_cases=MODULE[: MODULE.index("@pytest.mark", MODULE.index("test_full"))]
    )
    third = refresh(pytester)
    third.stdout.fnmatch_lines(
        ["pytest-vram refresh: 0 created, 0 updated, 1 unchanged, 1 unused (removed)"]
    )
    assert set(json.loads(path.read_text())["entries"]) == {"test_full"}


def test_refresh_passes_arguments_to_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cases=MODULE)
    result = refresh(pytester, "-k", "lora")
    result.stdout.fnmatch_lines(
        ["pytest-vram refresh: 1 created, 0 updated, 0 unchanged, 0 unused"]
    )
    entries = json.loads((pytester.path / "baselines/host-cpu/test_cases.json").read_text())[
        "entries"
    ]
    assert set(entries) == {"test_lora"}


def test_refresh_needs_a_command(pytester: pytest.Pytester) -> None:
    result = pytester.run(sys.executable, "-m", "pytest_vram.cli")
    assert result.ret == 2
    result.stderr.fnmatch_lines(["*the following arguments are required: command*"])


def test_version_answers_without_importing_torch(pytester: pytest.Pytester) -> None:
    from pytest_vram import __version__

    probe = (
        "import sys, runpy; sys.argv = ['pytest-vram', '--version']\n"
        "try:\n    runpy.run_module('pytest_vram.cli', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('torch' in sys.modules, exit.code)\n"
    )
    result = pytester.run(sys.executable, "-c", probe)
    assert result.outlines == [f"pytest-vram {__version__}", "False 0"]
