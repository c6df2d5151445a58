"""Isolation: every case runs in its own child, so a crash, an OOM or a hang ends one test only.

The cases are ``vram.measure(fn)`` calls on module-level functions of the pytester test module;
the child imports that module by name (the parent's sys.path travels with each case).
"""

from __future__ import annotations

import pytest

from conftest import output


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


CASES = """
    import ctypes
    import os
    import sys
    import time

    import pytest


    def fine():
        return None


    def aborts():
        print("LAST WORDS before abort", file=sys.stderr, flush=True)
        os.abort()


    def segfaults():
        print("LAST WORDS before segfault", file=sys.stderr, flush=True)
        ctypes.string_at(0)


    def eats_memory():
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, hard))
        chunks = []
        while True:
            chunks.append(bytearray(16 * 2**20))


    def hangs():
        time.sleep(120)
"""


def module(*tests: str) -> str:
    """The case functions above plus one marked test per ``name:function`` pair."""
    body = [CASES]
    for spec in tests:
        name, fn = spec.split(":")
        body.append(
            "\n\n    @pytest.mark.vram_budget(gb=1)\n"
            f"    def {name}(vram):\n        vram.measure({fn})\n"
        )
    return "".join(body)


def assert_file_lacks(vram_project, *tests: str) -> None:
    entries = vram_project.baseline()["entries"]
    for test in tests:
        assert test not in entries


def test_measure_runs_module_level_function_in_child(vram_project) -> None:
    """Sanity: a function of the test module reaches the child and is measured and recorded."""
    vram_project.write(module("test_fine:fine"))
    result = vram_project.record()
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [r"^test_mem\.py::test_fine\s+test_mem\.fine\s+host\s+0\.000\s+1\.000\s+-\s+-\s+created$"]
    )
    assert list(vram_project.entry("test_fine", "test_mem.fine")["step_peak_bytes"]) == [0]
    vram_project.run().assert_outcomes(passed=1)


def test_abort_fails_only_its_own_test(vram_project) -> None:
    vram_project.write(module("test_before:fine", "test_abort:aborts", "test_after:fine"))
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_abort*", "case killed by SIGABRT [[]test_mem.aborts]"])
    result.stdout.fnmatch_lines(["FAILED test_mem.py::test_abort*"])
    assert "INTERNALERROR" not in output(result)
    # the crashed case produced no result, so nothing was recorded for it
    assert_file_lacks(vram_project, "test_abort")
    assert set(vram_project.baseline()["entries"]) == {"test_before", "test_after"}


@pytest.mark.parametrize(
    ("fn", "signal_name", "words"),
    [("aborts", "SIGABRT", "before abort"), ("segfaults", "SIGSEGV", "before segfault")],
)
def test_crash_shows_tail_of_case_output(vram_project, fn, signal_name, words) -> None:
    vram_project.write(module(f"test_crash:{fn}"))
    result = vram_project.run("--vram-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"case killed by {signal_name} [[]test_mem.{fn}]",
            "--- tail of the case's output ---",
            f"LAST WORDS {words}",
        ]
    )


def test_out_of_memory_fails_with_out_of_memory(vram_project) -> None:
    vram_project.write(module("test_hog:eats_memory", "test_after:fine"))
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["out of memory: MemoryError* [[]test_mem.eats_memory]"])
    result.stdout.fnmatch_lines(["FAILED test_mem.py::test_hog*"])
    assert_file_lacks(vram_project, "test_hog")


def test_hang_is_killed_after_timeout_and_run_continues(vram_project) -> None:
    vram_project.write(module("test_hang:hangs", "test_after:fine"))
    result = vram_project.run("--vram-update", "--vram-timeout=2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["timed out after 2 s (--vram-timeout), killed [[]test_mem.hangs]"])
    result.stdout.fnmatch_lines(["FAILED test_mem.py::test_hang*"])
    assert result.duration < 60, "the hanging case was not killed at the timeout"
    assert_file_lacks(vram_project, "test_hang")


LAMBDA = """
    import pytest

    @pytest.mark.vram_budget(gb=1)
    def test_lambda(vram):
        vram.measure(lambda: None)
"""


def test_measure_lambda_fails_with_importable_function_message(vram_project) -> None:
    vram_project.write(LAMBDA)
    result = vram_project.run("--vram-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "vram.measure needs an importable module-level function and picklable arguments; "
            "test_mem.test_lambda.<locals>.<lambda> cannot be sent to the worker: *"
        ]
    )
    assert not vram_project.baseline_path().exists()


def test_measure_lambda_message_is_shown_once(vram_project) -> None:
    """pytest.fail() inside ``except SpecError`` chains the SpecError: the text shows twice."""
    vram_project.write(LAMBDA)
    result = vram_project.run("--vram-update")
    result.assert_outcomes(failed=1)
    text = output(result)
    assert "During handling of the above exception" not in text
    starts = [line for line in result.outlines if line.startswith("vram.measure needs")]
    assert len(starts) == 1, text
