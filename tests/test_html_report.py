"""--vram-html: the run as one self-contained HTML page, checked as markup and in a real browser.

Cases run on the fake meter (tiny-llama, a second or two each): one run through the plugin with
pytester, and a few results measured by the session's worker for the unit tests of the page.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import GIB, output
from pytest_vram.errors import extra, missing_library
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.units import format_bytes
from pytest_vram.verdict import Budget, judge

pytest.importorskip("matplotlib", reason="the report extra (matplotlib) is not installed")

from pytest_vram import html_report  # noqa: E402 - after the skip: it imports matplotlib

FAKE = 'model="tiny-llama", batch=1, seq=32, device="fake"'
PROJECT = f"""
import pytest

@pytest.mark.vram_budget(gb=1, {FAKE})
def test_fits(vram):
    vram.step()
    vram.step(method="lora")

@pytest.mark.vram_budget(gb=0.01, {FAKE})
def test_too_big(vram):
    vram.step()

@pytest.mark.vram_budget(gb=1, {FAKE})
@pytest.mark.parametrize("tag", ["<b>&", "\\"q'$x$"])
def test_escaped(vram, tag):
    vram.step()

@pytest.mark.vram_budget(gb=1, {FAKE}, zero=2, ranks=2, offload="optimizer")
def test_zero(vram):
    vram.step()
"""
VOID = {"meta", "br", "img", "input", "link", "hr", "wbr", "col", "area", "base", "source"}


class Page(HTMLParser):
    """The parts of a report the tests read, checking on the way that every element is closed
    in order (html.parser itself accepts anything)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.sections: list[dict[str, Any]] = []  # id, class, title (its h2), text, svgs
        self.links: list[tuple[str, str]] = []  # (attribute, value) of every src= and href=
        self.svgs = 0  # outside sections too: the summary chart
        self.feed(text)
        self.close()
        assert not self.stack, f"never closed: {self.stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.links += [(k, v or "") for k, v in attrs if k in ("src", "href", "xlink:href")]
        if tag == "section":
            self.sections.append(
                {"id": values["id"], "class": values["class"], "title": "", "text": "", "svgs": 0}
            )
        if tag == "svg":
            self.svgs += 1
            if self.stack.count("section"):
                self.sections[-1]["svgs"] += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [(k, v or "") for k, v in attrs if k in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if "section" in self.stack:
            self.sections[-1]["text"] += data
            if "h2" in self.stack:
                self.sections[-1]["title"] += data


def assert_self_contained(text: str, page: Page) -> None:
    """Nothing the browser would fetch: links stay inside the page, no script, no import."""
    assert page.links and all(value.startswith("#") for _, value in page.links), page.links
    lowered = text.lower()
    for fetch in ("<script", "<link", "<img", "<iframe", "@import", "url(http", "src="):
        assert fetch not in lowered, fetch


def test_a_run_writes_one_section_per_case_with_inline_charts(vram_project) -> None:
    vram_project.write(PROJECT)
    result = vram_project.run(
        "--vram-update", "--vram-html=reports/vram.html", "--vram-json=reports/vram.json"
    )
    result.assert_outcomes(passed=4, failed=1)
    path = vram_project.path / "reports" / "vram.html"
    text = path.read_text("utf-8")
    assert not list(path.parent.glob(".*.tmp"))  # written, then renamed
    page = Page(text)
    assert_self_contained(text, page)
    rows = json.loads((vram_project.path / "reports" / "vram.json").read_text())["cases"]
    assert len(page.sections) == len(rows) == 6
    assert (
        "<p class='counts'><span>6 cases</span><span>5 passed</span><span>1 failed</span>" in text
    )
    assert "6 new (no baseline before this run)" in text
    # Failed cases first, flagged, with their reason; every case has its two charts inline.
    first = page.sections[0]
    assert first["class"] == "case fail" and "test_mem.py::test_too_big" in first["text"]
    assert "FAIL" in first["text"] and "exceeds budget 10.24 MiB" in first["text"]
    assert all(s["class"] == "case new" for s in page.sections[1:])
    assert all(s["svgs"] == 2 for s in page.sections), [s["svgs"] for s in page.sections]
    assert page.svgs == 2 * len(rows) + 1  # and the summary chart
    for row in rows:  # each case's numbers as the terminal prints them
        (section,) = (
            s for s in page.sections if row["test"] in s["title"] and row["label"] in s["text"]
        )
        assert f"peak  {format_bytes(row['peak_bytes'])}" in section["text"]  # the bar's name
        assert f"peak{format_bytes(row['peak_bytes'])} (" in section["text"]  # the table's
        if row["snapshot"]:  # a memory snapshot the session kept
            assert f"memory snapshot: {row['snapshot']}" in section["text"]
    # Test ids are text, never markup; the parser reads them back as they were.
    assert "test_escaped[<b>&]" not in text and 'test_escaped["q' not in text
    assert html.escape("test_mem.py::test_escaped[<b>&]") in text
    assert any("test_escaped[\"q'$x$]" in s["text"] for s in page.sections)
    zero = next(s for s in page.sections if "test_zero" in s["text"])
    for name in ("rank 0", "rank 1", "host offload (all ranks)", "rank 1 host offload"):
        assert name in zero["text"], name


def test_a_missing_plotting_library_is_a_session_error_with_its_install_line(
    vram_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    vram_project.write("def test_plain():\n    pass\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    import pytest_vram

    for name in ("html_report", "html_charts"):  # imported again, as in a fresh process
        monkeypatch.delitem(sys.modules, f"pytest_vram.{name}")
        monkeypatch.delattr(pytest_vram, name)
    result = vram_project.run("--vram-html=r.html")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    line = missing_library("matplotlib", extra("report"), needed_by="the HTML report needs")
    assert f"ERROR: --vram-html: {line}" in output(result)
    assert "pip install 'matplotlib>=3.10,<3.12' (pytest-vram's report extra)" in line
    assert not (vram_project.path / "r.html").exists()


def test_importing_the_charts_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "pytest_vram.html_charts")
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed: pip"):
        importlib.import_module("pytest_vram.html_charts")


# -- the page, from results the session's worker measured ---------------------------------------


@pytest.fixture(scope="module")
def measured(pytestconfig: pytest.Config) -> dict[str, MemoryResult]:
    """Real results on the fake meter: full fine-tuning, LoRA, and ZeRO-2 with optimizer
    offload on two ranks."""
    from pytest_vram.plugin import SESSION
    from pytest_vram.worker import CaseFailure, Job

    session = pytestconfig.stash[SESSION]
    specs = {
        "full": StepSpec(model="tiny-llama", batch=1, seq=32),
        "lora": StepSpec(model="tiny-llama", method="lora", batch=1, seq=32),
        "zero": StepSpec(model="tiny-llama", batch=1, seq=32, zero=2, ranks=2, offload="optimizer"),
    }
    results = {}
    for name, spec in specs.items():
        out = session.worker.run(Job("fake", spec=spec), session.settings.timeout_s)
        if isinstance(out, CaseFailure):
            pytest.fail(out.long_repr(), pytrace=False)
        results[name] = out
    return results


def _row(test: str, result: MemoryResult, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"strict": False, "update": False, "record_hint": "--vram-update"}
    options.update(kwargs)
    budget, baseline = options.pop("budget", Budget(GIB, 0.05)), options.pop("baseline", None)
    row = judge(test, result, budget, baseline, **options).row()
    row["snapshot"] = None  # as the session adds it
    return row


@pytest.fixture(scope="module")
def rows(measured: dict[str, MemoryResult]) -> list[dict[str, Any]]:
    full, lora, zero = measured["full"], measured["lora"], measured["zero"]
    smaller = dataclasses.replace(lora, peak_bytes=int(lora.peak_bytes * 0.8))
    return [
        _row("suite.py::test_method[full]", full, baseline=full),
        _row("suite.py::test_method[lora]", lora, baseline=smaller),  # drifted up: fails
        _row("suite.py::test_zero", zero, budget=Budget(None, 0.05), update=True),
        _row(
            "suite.py::test_old[<i>'x\"]", dataclasses.replace(full, timeline=None), baseline=full
        ),
    ]


def test_failed_cases_come_first_and_each_has_its_verdict(rows: list[dict[str, Any]]) -> None:
    text = html_report.render(rows, ["an <error> of the session"])
    page = Page(text)
    assert_self_contained(text, page)
    order = [s["title"] for s in page.sections]
    assert [s["class"] for s in page.sections] == [
        "case fail",
        "case pass",
        "case new",
        "case pass",
    ]
    assert "test_method[lora]" in order[0]
    lora = page.sections[0]["text"]
    assert "from baseline" in lora and "beyond tolerance 5.0%" in lora
    assert "over-budget" not in lora and "drift-up" in lora
    assert "an &lt;error&gt; of the session" in text
    assert "4 cases</span><span>3 passed</span><span>1 failed</span><span>1 new" in text
    toc = text.index("<ol class='toc'>")
    anchors = [text.index(f"href='#case-{i}'", toc) for i in (1, 2, 3, 4)]
    assert anchors == sorted(anchors) and all(f"id='case-{i}'" in text for i in (1, 2, 3, 4))


def test_marks_ranks_and_timeline_peak_are_drawn(
    rows: list[dict[str, Any]], measured: dict[str, MemoryResult]
) -> None:
    page = Page(html_report.render(rows))
    by_test = {s["title"]: s for s in page.sections}
    full = next(s for t, s in by_test.items() if "test_method[full]" in t)
    timeline = measured["full"].timeline
    assert timeline is not None and timeline.peak_bytes == measured["full"].peak_bytes
    assert f"peak {format_bytes(timeline.peak_bytes)}" in full["text"]  # the marked peak
    for phase in ("step 1", "step 2", "operator index"):
        assert phase in full["text"]
    zero = next(s for t, s in by_test.items() if "test_zero" in t)
    offload = measured["zero"].ranks[0].host_offload_bytes
    assert offload > 0 and f"rank 0 host offload  {format_bytes(offload)}" in zero["text"]
    old = next(s for t, s in by_test.items() if "test_old" in t)
    assert old["svgs"] == 1 and "No timeline" in old["text"]


def test_the_baseline_mark_is_drawn_only_with_a_baseline(rows: list[dict[str, Any]]) -> None:
    with html_report.html_charts.style():
        result = MemoryResult.from_dict(rows[0]["result"])
        marked = html_report.html_charts.breakdown_svg(result, GIB, result.peak_bytes, "a")
        unmarked = html_report.html_charts.breakdown_svg(result, GIB, None, "a")
    assert "stroke-dasharray" in marked and "stroke-dasharray" not in unmarked


def test_text_is_escaped_everywhere(rows: list[dict[str, Any]]) -> None:
    hostile = "t.py::test_x[<script>alert('x')</script>\"&]"
    row = dict(rows[0], test=hostile, reasons=["peak <b>1</b> & more"], notes=['"quoted" <n>'])
    text = html_report.render([row])
    assert "<script" not in text and "<b>1</b>" not in text and "<n>" not in text
    section = Page(text).sections[0]["text"]
    assert hostile in section and "peak <b>1</b> & more" in section and '"quoted" <n>' in section


def test_an_unreadable_result_still_gets_its_section(rows: list[dict[str, Any]]) -> None:
    row = dict(rows[0], result={"label": "x"})
    section = Page(html_report.render([row])).sections[0]
    assert "the case's result cannot be read" in section["text"] and section["svgs"] == 0


def test_the_page_is_the_same_for_the_same_rows(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "deep" / "report.html"
    html_report.write_html(path, rows, [])
    html_report.write_html(path, rows, [])  # over the first
    assert path.read_text("utf-8") == html_report.render(rows, [])
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def test_no_cases_is_still_a_page() -> None:
    text = html_report.render([], [])
    assert "<span>0 cases</span>" in text and not Page(text).sections


# -- in a real browser ----------------------------------------------------------------------


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium or chrome binary on PATH (.ci/run installs Debian's chromium)")


def _run_browser(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        # The page is our own file, never the network's; containers (and root) lack the
        # namespaces Chromium's sandbox needs.
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        # Without these Chromium calls home at start; a closed network refuses it, slowly.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    env = dict(os.environ, HOME=str(tmp_path))  # nothing written to the real home
    done = subprocess.run(
        [browser, *flags, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_report_renders_in_a_headless_browser(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    browser = _browser()
    page = tmp_path / "report.html"
    html_report.write_html(page, rows, [])
    dom = _run_browser(browser, tmp_path, "--dump-dom", page.as_uri()).stdout
    # The rendered DOM holds every chart: the summary, and two per case with a timeline.
    assert dom.count("<svg") == 1 + 2 * 3 + 1, dom[:500]
    assert "suite.py::test_method[lora]" in dom

    shot = tmp_path / "report.png"
    _run_browser(
        browser, tmp_path, "--hide-scrollbars", "--window-size=1200,2400",
        f"--screenshot={shot}", page.as_uri(),
    )  # fmt: skip
    from matplotlib.image import imread

    pixels: Any = imread(str(shot))[..., :3]  # floats in 0..1, RGB(A)
    assert pixels.shape[:2] == (2400, 1200)
    inked = (pixels < 0.94).any(axis=-1).mean()
    assert inked > 0.05, f"only {inked:.1%} of the page is not white"
    colours = {tuple(c) for c in (pixels.reshape(-1, 3)[::7] * 255).round().astype(int).tolist()}
    assert len(colours) > 50, len(colours)
    # The bars are there: pixels of the parameters' blue (#0072B2) and the failed case's red
    # summary bar (#C0392B), as the charts draw them.
    assert _has_colour(pixels, (0x00, 0x72, 0xB2)) and _has_colour(pixels, (0xC0, 0x39, 0x2B))


def _has_colour(pixels: Any, rgb: tuple[int, int, int], count: int = 50) -> bool:
    import numpy as np

    match = np.isclose(pixels, np.array(rgb) / 255, atol=3 / 255).all(axis=-1)
    return int(match.sum()) >= count
