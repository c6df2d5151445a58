"""``--vram-html PATH``: the run as one self-contained HTML page, for people and CI artifacts.

At the top the counts, a table of contents and a chart of every case's peak beside its budget
and baseline; then one section per case, failed cases first: the verdict with its reasons, the
numbers, the breakdown at the peak (per rank for ZeRO, host offload beside it), and device
memory over the steps. Everything is inline (SVG charts from ``html_charts``, CSS, no script):
the page fetches nothing, so it reads the same offline and from a CI artifact store.

Runs in the pytest process (controller only), at the end of the session; every text from a
row is escaped, since test ids and labels hold ``[``, ``<`` and quotes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pytest_vram import calibration, files, html_charts
from pytest_vram.result import MemoryResult
from pytest_vram.units import format_bytes, format_gib

__all__ = ["kind", "render", "write_html"]

_CSS: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  margin: 0 auto; max-width: 1100px; padding: 1em 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.05em; margin: 0 0 0.3em; }
code, pre { font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
pre { white-space: pre-wrap; margin: 0.3em 0; }
.counts span { margin-right: 1.2em; font-weight: 600; }
.badge { display: inline-block; min-width: 3.2em; text-align: center; border-radius: 3px;
  padding: 0 0.4em; color: #fff; font-size: 0.8em; font-weight: 700; vertical-align: 1px; }
.badge.fail { background: #C0392B; } .badge.new { background: #B9770E; }
.badge.pass { background: #1F618D; }
.case { border: 1px solid #DDD; border-left: 6px solid #1F618D; border-radius: 4px;
  padding: 0.8em 1em; margin: 1.2em 0; break-inside: avoid; }
.case.fail { border-left-color: #C0392B; background: #FDF2F0; }
.case.new { border-left-color: #B9770E; }
.label { color: #444; margin: 0 0 0.5em; }
.reasons { color: #922B21; margin: 0.3em 0; padding-left: 1.2em; }
.notes { color: #555; margin: 0.3em 0; padding-left: 1.2em; }
table.numbers { border-collapse: collapse; margin: 0.4em 0; }
table.numbers th, table.numbers td { padding: 1px 0.8em 1px 0; text-align: left;
  font-weight: normal; vertical-align: top; }
table.numbers th { color: #666; }
figure { margin: 0.6em 0; } figure svg { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; }
.key { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: -1px;
  margin: 0 0.25em 0 0.7em; border: 1px solid #888; }
.key.line { width: 0; border-width: 0 0 0 3px; }
.toc { columns: 2; column-gap: 3em; font-size: 13px; padding-left: 2.2em; }
.toc li { break-inside: avoid; }
.errors { color: #922B21; }
@media print { .case { page-break-inside: avoid; } }
"""


def write_html(path: Path, rows: Sequence[dict[str, Any]], errors: Sequence[str]) -> None:
    """Write the report to ``path``: to a temporary file, then renamed, so a reader (a CI
    upload step, a browser) never sees half a page."""
    files.write_text(path, render(rows, errors))


_KINDS: Final = (("pass", "passed"), ("new", "new"), ("fail", "failed"))
_PHASES: Final = {"setup": "setup (not counted in the peak)"}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _new(row: Mapping[str, Any]) -> bool:
    """Whether the case had no baseline before this run."""
    return row.get("action") == "created" or "no-baseline" in str(row.get("status", ""))


def kind(row: Mapping[str, Any]) -> str:
    """How a case is flagged: ``fail``; ``new``, passed with no baseline before this run; or
    ``pass``."""
    if row.get("failed"):
        return "fail"
    return "new" if _new(row) else "pass"


def _order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed cases first; otherwise in the order they ran."""
    return sorted(rows, key=lambda r: kind(r) != "fail")


def _group(test: str) -> str:
    """The test a case belongs to, without its parameters: a parametrized test's cases (one
    per method, say) share one group in the summary chart."""
    return test.split("[", 1)[0]


def render(rows: Sequence[dict[str, Any]], errors: Sequence[str] = ()) -> str:
    """The whole page as text."""
    with html_charts.style():
        return _render(rows, errors)


def _render(rows: Sequence[dict[str, Any]], errors: Sequence[str]) -> str:
    ordered = _order(rows)
    anchors = {id(r): f"case-{i + 1}" for i, r in enumerate(ordered)}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>pytest-vram report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>pytest-vram report</h1>",
        *_counts(ordered, errors),
    ]
    if ordered:
        parts.append("<h2>Contents</h2><ol class='toc'>")
        for row in ordered:
            k = kind(row)
            parts.append(
                f"<li><a href='#{anchors[id(row)]}'><span class='badge {k}'>{k.upper()}</span> "
                f"<code>{_e(row['test'])}</code></a> {_e(row['label'])}</li>"
            )
        parts.append("</ol>")
        parts.extend(_summary(rows))
    for row in ordered:
        parts.extend(_case(row, anchors[id(row)]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _counts(rows: Sequence[Mapping[str, Any]], errors: Sequence[str]) -> Iterator[str]:
    failed = sum(bool(r.get("failed")) for r in rows)
    yield (
        f"<p class='counts'><span>{len(rows)} cases</span>"
        f"<span>{len(rows) - failed} passed</span><span>{failed} failed</span>"
        f"<span>{sum(map(_new, rows))} new (no baseline before this run)</span>"
    )
    actions = [r["action"] for r in rows if r.get("action")]
    if actions:
        done = ", ".join(f"{actions.count(a)} {a}" for a in ("created", "updated", "unchanged"))
        yield f"<span>baselines: {_e(done)}</span>"
    yield "</p>"
    if errors:
        yield "<div class='errors'><h2>Session errors</h2><ul>"
        yield from (f"<li><pre>{_e(e)}</pre></li>" for e in errors)
        yield "</ul></div>"


def _summary(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:  # in run order: a test's cases stay in the order they were measured
        groups.setdefault(_group(row["test"]), []).append(row)
    chart_groups = []
    for test, members in groups.items():
        labels = [m["label"] for m in members]
        cases = []
        for m in members:
            text = m["label"]
            if labels.count(text) > 1:  # same label, different parameters: tell them apart
                text = f"{m['test'][len(test) :]} {text}"
            cases.append({**_numbers(m), "kind": kind(m), "text": text})
        chart_groups.append((test, cases))
    yield "<h2>Peaks</h2><figure>"
    yield html_charts.summary_svg(chart_groups, salt="summary")
    yield (
        "<figcaption>Peak device memory of every case, grouped by test: "
        f"{_keys((name, html_charts.STATUS_COLORS[k]) for k, name in _KINDS)}"
        f"<span class='key line' style='border-color:{html_charts.BUDGET}'></span>budget"
        "<span class='key' style='border:1.5px solid #000;border-radius:50%;width:0.5em;"
        "height:0.5em'></span>baseline</figcaption></figure>"
    )


def _numbers(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in ("peak_bytes", "budget_bytes", "baseline_bytes")}


def _case(row: dict[str, Any], anchor: str) -> Iterator[str]:
    k = kind(row)
    yield f"<section class='case {k}' id='{anchor}'>"
    yield f"<h2><span class='badge {k}'>{k.upper()}</span> <code>{_e(row['test'])}</code></h2>"
    try:
        result: MemoryResult | None = MemoryResult.from_dict(row["result"])
        problem = None
    except (KeyError, TypeError, ValueError) as exc:  # a row from a foreign or older writer
        result, problem = None, f"the case's result cannot be read: {exc}"
    where = f" · meter {result.meter} · device {result.device}" if result else ""
    yield f"<p class='label'><code>{_e(row['label'])}</code>{_e(where)}</p>"
    if row.get("reasons"):
        yield "<ul class='reasons'>"
        yield from (f"<li>{_e(r)}</li>" for r in row["reasons"])
        yield "</ul>"
    if row.get("details"):
        yield f"<pre class='details'>{_e(chr(10).join(row['details']))}</pre>"
    yield from _table(row, result)
    if result is not None and result.prediction is not None:
        yield from _prediction(result)
    if row.get("notes"):
        yield "<ul class='notes'>"
        yield from (f"<li>note: {_e(n)}</li>" for n in row["notes"])
        yield "</ul>"
    # The kept snapshot (session.keep_snapshot); the result's own path is a temporary file,
    # deleted when the case passed.
    snapshot = row.get("snapshot")
    if snapshot:
        yield (
            f"<p>memory snapshot: <code>{_e(snapshot)}</code> "
            "(open it in PyTorch's memory_viz page, pytorch.org/memory_viz)</p>"
        )
    if problem:
        yield f"<p class='reasons'>{_e(problem)}</p>"
    if result is not None:
        yield from _charts(row, result, anchor)
    yield "</section>"


def _table(row: Mapping[str, Any], result: MemoryResult | None) -> Iterator[str]:
    peak: int = row["peak_bytes"]
    budget, base = row.get("budget_bytes"), row.get("baseline_bytes")
    gib = format_gib((peak, budget, base))
    cells: list[tuple[str, str]] = [("peak", f"{format_bytes(peak)} ({gib[0]} GiB)")]
    if budget is not None:
        cells.append(("budget", f"{format_bytes(budget)} ({gib[1]} GiB)"))
    if base is not None:
        delta = f", {peak / base - 1:+.1%}" if base else ""
        cells.append(("baseline", f"{format_bytes(base)} ({gib[2]} GiB{delta})"))
    status = str(row.get("status") or "").split(",")
    cells.append(("verdict", ", ".join(filter(None, (*status, row.get("action"))))))
    if result is not None:
        if result.host_offload_bytes:
            cells.append(("host offload", format_bytes(result.host_offload_bytes)))
        cells.extend((name, format_bytes(nbytes)) for name, nbytes in result.device_counts())
        if result.step_peak_bytes:
            steps = ", ".join(format_bytes(b) for b in result.step_peak_bytes)
            cells.append(("per-step peaks", steps))
        cells.append(
            ("trainable", f"{result.trainable_params:,d} of {result.total_params:,d} params")
        )
    yield "<table class='numbers'>"
    yield from (f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in cells)
    yield "</table>"


def _prediction(result: MemoryResult) -> Iterator[str]:
    """The fake meter's prediction beside what the case measured (--gpu, --vram-calibrate)."""
    p = result.prediction
    assert p is not None
    if p.unsupported:
        yield f"<p class='notes'>No prediction: {_e(p.unsupported)}</p>"
        return
    measured = {
        "storage": result.peak_bytes if result.peak_source == "storage" else None,
        "allocated": result.allocated_bytes,
        "reserved": result.reserved_bytes,
        "nvml": result.nvml_bytes,
    }
    yield "<table class='numbers prediction'>"
    yield "<tr><th>predicted</th><th>fake meter</th><th>measured</th><th>error</th></tr>"
    for name, predicted, value, error in calibration.comparison(p, measured):
        checked = " (checked)" if name == result.peak_source else ""
        cells = (
            format_bytes(predicted),
            "-" if value is None else format_bytes(value),
            "-" if error is None else f"{error:+.1%}",
        )
        yield f"<tr><th>{_e(name + checked)}</th>" + "".join(f"<td>{_e(c)}</td>" for c in cells)
        yield "</tr>"
    yield "</table>"
    if p.device:
        yield f"<p class='notes'>device profile: {_e(p.device)}</p>"


def _keys(items: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f"<span class='key' style='background:{color}'></span>{_e(name)}" for name, color in items
    )


def _charts(row: Mapping[str, Any], result: MemoryResult, anchor: str) -> Iterator[str]:
    yield "<figure>"
    yield html_charts.breakdown_svg(
        result, row.get("budget_bytes"), row.get("baseline_bytes"), salt=f"{anchor}-breakdown"
    )
    terms = _keys((name, color) for _, name, color in html_charts.TERMS)
    yield (
        f"<figcaption>Breakdown at the peak: {terms}"
        "<span class='key' style='background:repeating-linear-gradient(45deg,#fff 0 2px,"
        f"{html_charts.HOST} 2px 3px)'></span>host offload (not device memory)"
        f"<span class='key line' style='border-color:{html_charts.BUDGET}'></span>budget"
        "<span class='key line' style='border-style:dotted;border-color:#000'></span>baseline"
        "</figcaption></figure>"
    )
    timeline = html_charts.timeline_svg(result, salt=f"{anchor}-timeline")
    if timeline is None:
        yield "<p class='notes'>No timeline: this result was measured without one.</p>"
        return
    lines = html_charts.timelines(result)
    keys = "".join(
        f"<span class='key line' style='border-color:{html_charts.line_color(i, len(lines))}'>"
        f"</span>{_e(name)}"
        for i, (name, _) in enumerate(lines)
    )
    peak = html_charts.step_peak(lines)
    differs = ""
    if peak is not None and peak[2] != result.peak_bytes:
        # The fake meter lays out a ZeRO case's partitions by arithmetic, while its timeline
        # traces the unsharded step: the two need not meet.
        differs = (
            f". The steps' highest point here, {format_bytes(peak[2])}, is not the case's "
            f"peak, {format_bytes(result.peak_bytes)}"
        )
    phases = _keys((_PHASES.get(n, n), c) for n, c in html_charts.PHASE_COLORS.items())
    yield f"<figure>{timeline}"
    yield (
        "<figcaption>Device memory over the steps, live bytes after each allocation and free: "
        f"{keys}{phases}"
        f"<span style='color:{html_charts.PEAK}'> ▼</span> peak{differs}</figcaption></figure>"
    )
