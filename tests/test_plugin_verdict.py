"""Verdicts: budget ceiling, baseline drift up/down, tolerance precedence, the terminal table."""

from __future__ import annotations

import re

import pytest

from conftest import GIB, LABEL, SMALL, output
from pytest_vram.units import format_bytes, format_pair


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


ONE_TEST = f"""
    import pytest

    @pytest.mark.vram_budget(gb=0.25)
    def test_a(vram):
        vram.step({SMALL})
"""
TAG = re.escape(f"[{LABEL}]")


def mib3(nbytes: int) -> str:
    """A size as the table prints it when all are below 1 GiB."""
    return re.escape(f"{nbytes / 2**20:.3f}")


def row(
    test: str,
    spec: str,
    budget: str,
    delta: str,
    verdict: str,
    peak: str = r"[\d.]+",
    baseline: str = r"[\d.]+",
) -> str:
    """Regex of one line of the terminal vram table."""
    cells = [
        re.escape(f"test_mem.py::{test}"),
        re.escape(spec),
        "host",
        peak,
        re.escape(budget),
        baseline,
        re.escape(delta),
        re.escape(verdict),
    ]
    return "^" + r"\s+".join(cells) + "$"


def test_under_budget_passes_after_recording(vram_project) -> None:
    recorded, checked = vram_project.record_then_check(ONE_TEST)
    recorded.assert_outcomes(passed=1)
    checked.assert_outcomes(passed=1)
    assert checked.ret == 0
    peak = vram_project.entry("test_a")["peak_bytes"]
    assert 0 < peak < 0.25 * GIB
    checked.stdout.re_match_lines(
        [row("test_a", LABEL, "256.000", "+0.0%", "ok", peak=mib3(peak), baseline=mib3(peak))]
    )


def test_over_budget_fails_with_reason_and_breakdown(vram_project) -> None:
    vram_project.write(
        f"""
        import pytest

        @pytest.mark.vram_budget(gb=0.001)
        def test_a(vram):
            vram.step({SMALL})
        """
    )
    vram_project.record(ret=1)  # recorded, but the ceiling fails it even while recording
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    peak = vram_project.entry("test_a")["peak_bytes"]
    over = f"{peak / (int(0.001 * GIB)) - 1:+.1%}"
    shown = format_pair(peak, int(0.001 * GIB))
    assert shown[1] == "1.024 MiB"
    result.stdout.re_match_lines(
        [
            rf"^peak {re.escape(shown[0])} exceeds budget 1\.024 MiB \({re.escape(over)}\) {TAG}$",
            rf"^-+ vram {re.escape(LABEL)} -+$",
            rf"^{re.escape(LABEL)}  \(meter host, device host-cpu\)$",
            r"^  parameters\s+[\d.]+ GiB\s+[\d,]+ B$",
            r"^  buffers\s",
            r"^  gradients\s",
            r"^  optimizer state\s",
            r"^  activations and temporaries\s",
            rf"^  peak\s+[\d.]+ GiB\s+{peak:,d} B$",
            r"^  per-step peaks \(GiB\): [\d.]+, [\d.]+$",
            r"^  trainable params: [\d,]+ of [\d,]+$",
            r"^  budget: 0\.0010 GiB$",
            r"^  baseline: [\d.]+ GiB$",
        ]
    )
    # the baseline is there, so the only reason is the budget
    assert "no baseline" not in output(result)
    result.stdout.fnmatch_lines(["FAILED test_mem.py::test_a - peak * MiB exceeds budget*"])


def test_drift_up_beyond_tolerance_fails(vram_project) -> None:
    vram_project.record_then_check(ONE_TEST)[1].assert_outcomes(passed=1)
    peak = vram_project.entry("test_a")["peak_bytes"]
    base = vram_project.edit_entry("test_a", peak_factor=0.8)
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    drift = f"{peak / base - 1:+.1%}"
    delta = format_bytes(peak - base, sign=True)
    shown_peak, shown_base = (re.escape(text) for text in format_pair(peak, base))
    result.stdout.re_match_lines(
        [
            rf"^peak {shown_peak} is {re.escape(drift)} \({re.escape(delta)}\) "
            rf"from baseline {shown_base}, beyond tolerance 5\.0% {TAG}; "
            r"no library version changed since the baseline$"
        ]
    )
    assert drift == "+25.0%"
    result.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*\+25\.0%\s+FAIL drift-up$"])


def test_a_drift_is_shown_beside_a_failing_assert_of_the_test(vram_project) -> None:
    """The test's own assert is the failure; the drift it would have reported is not lost."""
    vram_project.record_then_check(ONE_TEST)
    vram_project.edit_entry("test_a", peak_factor=0.8)
    own_check = ONE_TEST + "        assert r.peak_bytes < 0, 'own check'\n"
    vram_project.write(own_check.replace("vram.step(", "r = vram.step("))
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    text = output(result)
    assert "AssertionError: own check" in text
    assert re.search(r"-+ vram verdict -+\npeak .* is \+25\.0% .* from baseline", text), text


def test_drift_up_names_changed_versions(vram_project) -> None:
    vram_project.record_then_check(ONE_TEST)
    torch_now = vram_project.entry("test_a")["versions"]["torch"]
    vram_project.edit_entry("test_a", peak_factor=0.8, versions={"torch": "0.0.1"})
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines(
        [
            r"^peak .* is \+25\.0% .* beyond tolerance 5\.0% .*; versions changed since the "
            rf"baseline: torch 0\.0\.1 -> {re.escape(torch_now)}$"
        ]
    )


def test_drift_down_is_a_note_but_fails_when_strict(vram_project) -> None:
    vram_project.record_then_check(ONE_TEST)
    vram_project.edit_entry("test_a", peak_factor=1.5)
    line = (
        r"peak [\d.]+ MiB is -33\.3% \(-[\d.]+ MiB\) from baseline [\d.]+ MiB, "
        r"beyond tolerance 5\.0% "
        rf"{TAG}; no library version changed since the baseline; tighten the baseline with: "
        r"pytest-vram refresh 'test_mem\.py::test_a'$"
    )
    relaxed = vram_project.run()
    relaxed.assert_outcomes(passed=1)
    relaxed.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*-33\.3%\s+drift-down$"])
    relaxed.stdout.re_match_lines([r"^note: test_mem\.py::test_a: " + line])

    strict = vram_project.run("--vram-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.re_match_lines([r"^" + line, rf"^-+ vram {re.escape(LABEL)} -+$"])
    strict.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*-33\.3%\s+FAIL drift-down$"])


def test_marker_tolerance_wins_over_option(vram_project) -> None:
    vram_project.write(
        f"""
        import pytest

        @pytest.mark.vram_budget(gb=0.25, tolerance=0.5)
        def test_loose(vram):
            vram.step({SMALL})

        @pytest.mark.vram_budget(gb=0.25, tolerance=0.2)
        def test_tight(vram):
            vram.step({SMALL})

        @pytest.mark.vram_budget(gb=0.25)
        def test_default(vram):
            vram.step({SMALL})
        """
    )
    vram_project.record()
    for test in ("test_loose", "test_tight", "test_default"):
        vram_project.edit_entry(test, peak_factor=0.8)  # +25% drift up for all three
    result = vram_project.run("--vram-tolerance=0.1", "-rA")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["PASSED test_mem.py::test_loose"])  # 0.5 beats --vram-tolerance
    text = output(result)
    # each failure names the tolerance it was judged with: the marker's, else the option's
    assert re.search(r"_+ test_tight _+\npeak .* beyond tolerance 20\.0% ", text), text
    assert re.search(r"_+ test_default _+\npeak .* beyond tolerance 10\.0% ", text), text


def test_terminal_table_lists_every_case(vram_project) -> None:
    vram_project.write(
        f"""
        import pytest

        @pytest.mark.vram_budget(gb=0.25, {SMALL})
        def test_two_cases(vram):
            vram.step()
            vram.step(method="lora")

        @pytest.mark.vram_budget(gb=0.001)
        def test_over(vram):
            vram.step({SMALL})
        """
    )
    vram_project.record(ret=1)
    vram_project.edit_entry("test_two_cases", peak_factor=0.8)
    result = vram_project.run()
    result.assert_outcomes(failed=2)
    lora = LABEL.replace(" full ", " lora ")
    result.stdout.re_match_lines(
        [
            r"^=+ vram =+$",
            r"^test\s+spec\s+meter\s+peak MiB\s+budget\s+baseline\s+delta\s+verdict$",
            row("test_two_cases", LABEL, "256.000", "+25.0%", "FAIL drift-up"),
            row("test_two_cases", lora, "256.000", "+0.0%", "ok"),
            row("test_over", LABEL, "1.024", "+0.0%", "FAIL over-budget"),
        ]
    )
