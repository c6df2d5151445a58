"""The HTML report's charts, each an inline SVG string drawn by matplotlib.

Why matplotlib: it writes SVG, so every chart is a few kilobytes of markup inside the page,
needing no script and no network (a CI artifact opened offline shows everything), and with
``svg.fonttype: "none"`` its labels stay text that can be searched and copied. A fixed
``svg.hashsalt`` and no metadata make the output the same for the same numbers. plotly would
inline about 3.5 MB of JavaScript into every report (or fetch it from a CDN), and vega-lite
needs its JavaScript runtime inlined too, to draw what a static picture shows as well.
``matplotlib.figure.Figure`` is used without pyplot: no backend selection, no global figure
registry to leak into the pytest process, and each figure is garbage once its SVG is written.

Runs in the pytest process (controller only), at the end of the session.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from pytest_vram.errors import extra, missing_library

try:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter
except ImportError as exc:  # the session turns this into one error line with the install line
    raise ImportError(
        missing_library("matplotlib", extra("report"), needed_by="the HTML report needs")
    ) from exc

from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.timeline import Timeline, decimate
from pytest_vram.units import format_bytes

__all__ = [
    "TERMS",
    "breakdown_svg",
    "line_color",
    "step_peak",
    "style",
    "summary_svg",
    "timeline_svg",
    "timelines",
]

# The five terms of a breakdown, in the order they stack, with their colours (the HTML legend
# and the charts share these). Colour-blind-safe (Okabe-Ito).
TERMS: Final = (
    ("param_bytes", "parameters", "#0072B2"),
    ("buffer_bytes", "buffers", "#56B4E9"),
    ("grad_bytes", "gradients", "#E69F00"),
    ("optimizer_bytes", "optimizer state", "#009E73"),
    ("activation_bytes", "activations and temporaries", "#CC79A7"),
)
HOST: Final = "#999999"
# Marks drawn over bars of any colour, a failed case's red one included: black, told apart by
# their shape (budget: a solid bar; baseline: dotted, or a hollow dot in the summary).
BUDGET: Final = "#000000"
BASELINE: Final = "#000000"
PEAK: Final = "#D55E00"
PHASE_COLORS: Final = {
    "setup": "#EEEEEE",
    "forward": "#D6EAF8",
    "backward": "#FDEBD0",
    "optimizer": "#D5F5E3",
}
# One line per rank in a ZeRO case's timeline (matplotlib's default cycle); one rank: LINE.
RANK_COLORS: Final = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B")
LINE: Final = "#333333"
STATUS_COLORS: Final = {"fail": "#C0392B", "new": "#E69F00", "pass": "#0072B2"}
# A case's charts, in inches: 880 px, the width of the page's text column.
WIDTH: Final = 9.2
# A timeline's plot is about 850 px wide: more points than that only add bytes to the page.
TIMELINE_POINTS: Final = 800
# dict[Any, Any]: matplotlib types rcParams keys as a Literal of every key it knows.
_RC: Final[dict[Any, Any]] = {
    "svg.fonttype": "none",  # text stays text: searchable, and no glyph outlines to inline
    "text.parse_math": False,  # a "$" in a test id is a dollar sign, not mathtext
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 9,
}
# What matplotlib puts before the <svg> element (XML declaration, DOCTYPE naming the SVG DTD's
# URL) and inside it (a dated metadata block): neither belongs inline, and the date would make
# two reports of the same numbers differ.
_PROLOGUE: Final = re.compile(r"\A.*?(?=<svg)", re.S)
_METADATA: Final = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
# Every chart names its groups figure_1, axes_1, ...: the same ids in each SVG of the page, and
# nothing refers to them (the ids that are referred to are hashed with the chart's salt).
_GROUP_ID: Final = re.compile(r'<g id="[a-z]+_\d+"')
# Path data as matplotlib writes it: six decimals of a point and a line per vertex. Two decimals
# are a hundredth of a point, and a timeline's path is then about half the bytes.
_PATH_DATA: Final = re.compile(r' d="([^"]*)"')
_DIGITS: Final = re.compile(r"(\.\d\d)\d+")
_UNITS: Final = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


@contextmanager
def style() -> Iterator[None]:
    """The charts' matplotlib settings, restored on exit, so the pytest process's own
    matplotlib (a user's plots) is left as it was. Every chart function runs inside it:
    rcParams are read when artists are made and when the SVG is written."""
    with matplotlib.rc_context(_RC):
        yield


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an inline ``<svg>`` element. ``salt`` makes its clip-path and marker ids
    unique within the page (two charts share one document's id space) and stable between runs."""
    buf = io.StringIO()
    matplotlib.rcParams["svg.hashsalt"] = salt  # style() restores it
    fig.savefig(buf, format="svg", metadata={"Date": None}, transparent=True)
    text = _METADATA.sub("", _PROLOGUE.sub("", buf.getvalue(), count=1), count=1)
    text = _PATH_DATA.sub(_short_path, text)
    return _GROUP_ID.sub("<g", text).strip()


def _short_path(match: re.Match[str]) -> str:
    data = _DIGITS.sub(r"\1", match[1]).replace("\n", "")
    return f' d="{data}"'


def _unit(largest: float) -> tuple[str, int]:
    """The unit an axis reaching ``largest`` bytes is labelled in. Charts plot values divided
    by its scale, so matplotlib's tick locator picks round numbers of that unit."""
    for name, scale in _UNITS:
        if largest >= scale:
            return name, scale
    return "B", 1


def breakdown_svg(
    result: MemoryResult,
    budget: int | None,
    baseline: int | None,
    salt: str,
) -> str:
    """Horizontal stacked bars of the breakdown at the peak: the case's, then each rank's
    (ZeRO). Under each device bar its host offload, hatched grey, as a bar of its own, since
    the budget checks device memory only. The budget marks every device bar (each rank must
    fit it); the baseline marks the case's bar (it is the highest rank's peak)."""
    rows: list[tuple[str, Breakdown | None, int]] = [("peak", result.breakdown, 0)]
    offloads = [result.host_offload_bytes, *(r.host_offload_bytes for r in result.ranks)]
    show_host = any(offloads) or (result.spec is not None and result.spec.offload != "none")
    if show_host:
        rows.append(("host offload" + (" (all ranks)" if result.ranks else ""), None, 0))
    if len(result.ranks) > 1:
        for i, rank in enumerate(result.ranks):
            rows.append((f"rank {i}", rank.breakdown, i + 1))
            if show_host:
                rows.append((f"rank {i} host offload", None, i + 1))
    totals = [result.peak_bytes, *offloads, *(r.peak_bytes for r in result.ranks)]
    unit, scale = _unit(max([*totals, budget or 0, baseline or 0, 1]))
    height = 0.7 + 0.3 * len(rows)  # inches: the rows, plus the axis and its label
    fig = Figure(figsize=(WIDTH, height))
    ax = fig.add_axes((2.0 / WIDTH, 0.55 / height, 1 - 2.2 / WIDTH, 1 - 0.65 / height))
    ys = list(range(len(rows)))[::-1]  # first row on top
    names = []
    device = [(y, b, owner) for y, (_, b, owner) in zip(ys, rows, strict=True) if b is not None]
    host = [(y, owner) for y, (_, b, owner) in zip(ys, rows, strict=True) if b is None]
    for _y, (name, breakdown, owner) in zip(ys, rows, strict=True):
        nbytes = offloads[owner] if breakdown is None else breakdown.total_bytes
        names.append(f"{name}  {format_bytes(nbytes)}")
    # One barh per term across all rows: a call per bar costs more than the drawing.
    left = [0.0] * len(device)
    for key, _label, color in TERMS:
        widths = [getattr(b, key) / scale for _, b, _ in device]
        ax.barh([y for y, _, _ in device], widths, left=left, height=0.7, color=color, lw=0)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    if host:
        widths = [offloads[owner] / scale for _, owner in host]
        ax.barh([y for y, _ in host], widths, height=0.5, color="none", edgecolor=HOST, hatch="///")
    if budget is not None:
        ax.vlines([budget / scale] * len(device), [y - 0.45 for y, _, _ in device],
                  [y + 0.45 for y, _, _ in device], color=BUDGET, linewidth=2)  # fmt: skip
    if baseline is not None:
        ax.vlines(baseline / scale, ys[0] - 0.45, ys[0] + 0.45, color=BASELINE, ls=":")
    ax.set_yticks(ys, names)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, None)
    ax.margins(x=0.04)
    ax.set_xlabel(unit, loc="right")
    return _svg(fig, salt)


def timelines(result: MemoryResult) -> list[tuple[str, Timeline]]:
    """The lines a case's timeline chart draws, by name: one per rank of a ZeRO case, else the
    case's own; none for a result measured before timelines existed."""
    lines: list[tuple[str, Timeline]] = []
    if len(result.ranks) > 1:
        lines = [(f"rank {i}", r.timeline) for i, r in enumerate(result.ranks) if r.timeline]
    if not lines and result.timeline is not None:
        lines = [("device", result.timeline)]
    return [(name, t) for name, t in lines if t.x]


def step_peak(lines: Sequence[tuple[str, Timeline]]) -> tuple[str, int, int] | None:
    """The highest point of the steps, (line, x, bytes): after setup, as the budget counts
    them. Building the model, the method and a ZeRO engine can go higher (ZeRO-3 gathers the
    whole model once), and that is not the step's memory."""
    best: tuple[str, int, int] | None = None
    for name, timeline in lines:
        begin = next((p.start for p in timeline.phases if p.name != "setup"), None)
        for x, nbytes in zip(timeline.x, timeline.live_bytes, strict=True):
            if (begin is None or x >= begin) and (best is None or nbytes > best[2]):
                best = (name, x, nbytes)
    return best


def line_color(index: int, lines: int) -> str:
    return LINE if lines == 1 else RANK_COLORS[index % len(RANK_COLORS)]


def timeline_svg(result: MemoryResult, salt: str) -> str | None:
    """Device memory over the steps: live bytes after each event, one line per rank (ZeRO),
    the phases of each step shaded behind, and the peak marked with its value. None when the
    result has no timeline."""
    lines = timelines(result)
    if not lines:
        return None
    phased = result.timeline or lines[0][1]
    start = min(t.x[0] for _, t in lines)
    end = max(t.x[-1] for _, t in lines)
    top = max(t.peak_bytes for _, t in lines)
    unit, scale = _unit(top)
    fig = Figure(figsize=(WIDTH, 2.2))  # its key is the HTML caption's: legends draw slowly
    ax = fig.add_axes((0.6 / WIDTH, 0.21, 1 - 0.75 / WIDTH, 0.7))
    following = [p.start for p in phased.phases[1:]] + [end]
    for phase, stop in zip(phased.phases, following, strict=True):
        color = PHASE_COLORS.get(phase.name, "#FFFFFF")
        ax.axvspan(phase.start, stop, color=color, linewidth=0, zorder=0)
        if phase.name == "forward":  # each step begins with its forward pass
            ax.text(phase.start, 1.01, f"step {phase.step}", fontsize=7, va="bottom",
                    transform=ax.get_xaxis_transform())  # fmt: skip
    for i, (_name, timeline) in enumerate(lines):
        x, live = decimate(timeline.x, timeline.live_bytes, TIMELINE_POINTS)
        ys = [b / scale for b in live]
        ax.step(x, ys, where="post", color=line_color(i, len(lines)), linewidth=1, zorder=2)
    peak = step_peak(lines)
    if peak is not None:
        peak_name, px, py = peak
        ax.plot([px], [py / scale], marker="v", color=PEAK, markersize=6, zorder=3)
        text = f"peak {format_bytes(py)}" + (f" ({peak_name})" if len(lines) > 1 else "")
        ax.annotate(text, (px, py / scale), xytext=(0, 5), textcoords="offset points",
                    ha="right" if px > start + (end - start) * 0.7 else "left",
                    va="bottom", fontsize=7, color=PEAK, zorder=4)  # fmt: skip
    ax.set_xlim(start, end)
    ax.set_ylim(0, max(top / scale * 1.2, 1e-9))
    ax.set_ylabel(unit)
    ax.set_xlabel("operator index" if phased.unit == "op" else "time (µs)", loc="right")
    return _svg(fig, salt)


def summary_svg(groups: Sequence[tuple[str, Sequence[dict[str, Any]]]], salt: str) -> str:
    """Every case's peak as a horizontal bar, grouped by test (so a parametrized test's cases
    sit side by side), coloured by verdict, with its budget (a mark) and baseline (a dot).
    ``groups``: (test, rows with a "kind" key of pass/fail/new and a "text" key)."""
    ys: list[float] = []
    labels: list[str] = []
    headers: list[int] = []
    cases: list[tuple[float, dict[str, Any]]] = []
    y = 0.0
    for test, rows in groups:
        headers.append(len(labels))
        ys.append(y)
        labels.append(test)
        y -= 1
        for row in rows:
            ys.append(y)
            labels.append(row["text"])
            cases.append((y, row))
            y -= 1
        y -= 0.4  # a gap between tests
    values = [
        v
        for _, row in cases
        for v in (row["peak_bytes"], row["budget_bytes"], row["baseline_bytes"])
        if v
    ]
    largest, smallest = max(values, default=1), min(values, default=1)
    unit, scale = _unit(largest)
    # Peaks of one run can span tiny test models and 70B ones: past 30x apart, a linear axis
    # would flatten the small bars to nothing.
    log = largest / smallest > 30
    # Room for the longest label at 7 pt (about 0.055 inch a character), within reason.
    width = 9.0
    left = min(0.6, 0.15 + max((len(t) for t in labels), default=10) * 0.055 / width)
    height = 0.8 + 0.19 * len(labels)
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left, 0.15 / height, 0.97 - left, 1 - 0.65 / height))
    for yy, row in cases:
        color = STATUS_COLORS[row["kind"]]
        ax.barh(yy, row["peak_bytes"] / scale, height=0.7, color=color, linewidth=0)
        if row["budget_bytes"]:
            budget = row["budget_bytes"] / scale
            ax.vlines(budget, yy - 0.45, yy + 0.45, color=BUDGET, linewidth=2)
        if row["baseline_bytes"]:
            ax.plot([row["baseline_bytes"] / scale], [yy], marker="o", color=BASELINE, ms=3)
    ax.set_yticks(ys, labels, fontsize=7)
    for i in headers:
        ax.get_yticklabels()[i].set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(y + 0.4, 0.6)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(smallest / scale / 1.5, largest / scale * 1.5)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(0, largest / scale * 1.05)
    ax.set_xlabel(f"peak, {unit}" + (" (log scale)" if log else ""))
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.5)
    ax.set_axisbelow(True)
    return _svg(fig, salt)
