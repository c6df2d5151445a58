"""The terminal summary: a pure object whose ``lines()`` yields text (never raises into pytest)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

from pytest_vram import calibration, files
from pytest_vram.units import column_unit, format_in

if TYPE_CHECKING:
    import pytest

__all__ = ["Summary", "benchmark_entries", "junit_properties", "write_benchmark_json", "write_json"]


def _delta(row: dict[str, Any]) -> str:
    base = row["baseline_bytes"]
    if not base:
        return "-"
    return f"{row['peak_bytes'] / base - 1:+.1%}"


@final
@dataclasses.dataclass
class Summary:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)  # "path: test / label"
    update: bool = False

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter(r["action"] for r in self.rows if r["action"])
        counts["unused"] = len(self.unused)
        return counts

    def count_line(self) -> str:
        c = self.counts()
        unused = f"{c['unused']} unused" + (" (removed)" if self.update and c["unused"] else "")
        return (
            f"{c['created']} created, {c['updated']} updated, {c['unchanged']} unchanged, {unused}"
        )

    def lines(self, width: int | None = None) -> Iterator[str]:
        """The summary's text. With a ``width`` the table fits it (its test ids and specs
        shortened when rows are wider, never its numbers or verdicts) and long notes wrap;
        None prints everything whole."""
        if self.rows:
            yield from _table(self.rows, width)
        yield from _notes(self.rows, width)
        yield from calibration.summary_lines(calibration.row_cases(self.rows))
        yield from calibration.outside_allocator_lines(self.rows)
        if self.update:
            yield f"vram baselines: {self.count_line()}"
        if self.unused:
            hint = "removed by this update" if self.update else "remove with --vram-update"
            yield f"{len(self.unused)} unused vram baseline entries ({hint}):"
            yield from (f"  {u}" for u in sorted(self.unused))  # xdist merges in any order

    @staticmethod
    def terminal_width(config: pytest.Config) -> int | None:
        """The width ``lines()`` fits in pytest's terminal: the width pytest reports (COLUMNS,
        else the terminal's, else 80). None, as pytest's own short summary does not trim, on a
        CI machine (CI or BUILD_NUMBER set; its log is read in a browser, and a COLUMNS set
        there still counts) and with -vv."""
        if config.getoption("verbose", 0) >= 2:
            return None
        if any(os.environ.get(name) for name in _CI_VARIABLES) and not os.environ.get("COLUMNS"):
            return None
        width = int(config.get_terminal_writer().fullwidth)
        # A Windows console wraps a line that fills its last column (pytest's sep() does so).
        return width - 1 if sys.platform == "win32" else width


_NAMED_CASES = 3  # a note shared by more cases names this many, then counts the rest
_CI_VARIABLES: Final = ("CI", "BUILD_NUMBER")  # as pytest's _pytest.compat.running_on_ci
_NOTE_INDENT: Final = "    "


def _notes(rows: Sequence[dict[str, Any]], width: int | None = None) -> Iterator[str]:
    """Each note once, with the cases it applies to (a simulation's note is on every ZeRO case
    of the fake meter: it was printed once per case). A note longer than ``width`` wraps
    between words, indented; a word (a test id) is never cut."""
    cases: dict[str, list[str]] = {}
    for row in rows:
        for note in row["notes"]:
            where = cases.setdefault(note, [])
            if row["test"] not in where:
                where.append(row["test"])
    for note, tests in cases.items():
        if len(tests) == 1:
            line = f"note: {tests[0]}: {note}"
        else:
            named = ", ".join(tests[:_NAMED_CASES])
            more = len(tests) - _NAMED_CASES
            rest = f" and {more} more" if more > 0 else ""
            line = f"note ({len(tests)} tests: {named}{rest}): {note}"
        if width is None or len(line) <= width:
            yield line
            continue
        yield from textwrap.wrap(
            line,
            width,
            subsequent_indent=_NOTE_INDENT,
            break_long_words=False,
            break_on_hyphens=False,
        )


# -- the table ----------------------------------------------------------------------------

_GAP: Final = "  "
_CUT: Final = "\u2026"  # one column: what a shortened test id or spec leaves out
_TEXT_MIN: Final = 4  # a shortened column keeps its header's width ("test", "spec")
_NUMERIC: Final = frozenset({3, 4, 5, 6})
_SEPARATORS: Final = frozenset(" _-[]/:.=,")
_WINDOWS: Final = 100  # at most so many ways to cut a value from within (the time it takes)


def _meter(result: dict[str, Any]) -> str:
    """host, fake, or cuda with the GPU: ``nvidia-h100-80gb-hbm3`` -> ``cuda h100-80gb``."""
    meter = str(result.get("meter", "?"))
    if meter != "cuda":
        return meter
    gpu = re.sub(r"^(nvidia-)?((geforce|tesla)-)?", "", str(result.get("device", "")))
    sized = re.match(r".*?\d+gb(?![a-z0-9])", gpu)  # up to the memory size
    return f"cuda {sized.group(0) if sized else gpu}".rstrip()


def _table(rows: Sequence[dict[str, Any]], width: int | None = None) -> Iterator[str]:
    sizes = [(r["peak_bytes"], r["budget_bytes"], r["baseline_bytes"]) for r in rows]
    unit = column_unit(v for size in sizes for v in size)  # one unit for the three columns
    header = ("test", "spec", "meter", f"peak {unit}", "budget", "baseline", "delta", "verdict")
    body = [
        [
            r["test"],
            r["label"],
            _meter(r.get("result") or {}),
            # three decimals, or as many more as tell apart the row's numbers that differ
            *format_in(size, unit),
            _delta(r),
            ("FAIL " if r["failed"] else "") + (r["action"] or r["status"]),
        ]
        for r, size in zip(rows, sizes, strict=True)
    ]
    if width is not None:
        _fit(header, body, width)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return _GAP.join(
            c.rjust(w) if i in _NUMERIC else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    yield fmt(header)
    for cells in body:
        yield fmt(cells)


def _fit(header: Sequence[str], body: list[list[str]], width: int) -> None:
    """Shortens the test and spec cells of ``body`` so its rows fit ``width``: the other
    columns keep their widths. Nothing changes when the rows fit."""
    columns = list(zip(header, *body, strict=True))
    fixed = sum(max(len(c) for c in col) for col in columns[2:])
    room = width - fixed - len(_GAP) * (len(header) - 1)
    tests, specs = [cells[0] for cells in body], [cells[1] for cells in body]
    if _width(tests) + _width(specs) <= room:
        return
    tests = _without_common_module(tests)
    cases = len(set(zip(tests, specs, strict=True)))
    best: tuple[int, list[str], list[str]] | None = None
    # The room shared between the two columns, then other shares if rows end up the same.
    for spec_width in _spec_widths(room, _width(tests), _width(specs)):
        # The specs, then the test ids in the room they leave, told apart with their specs;
        # or the test ids first, and the specs told apart among those of the same shown id.
        shown_specs = _fit_specs(tests, specs, spec_width)
        shown_tests = _shorten(tests, max(_TEXT_MIN, room - _width(shown_specs)), shown_specs)
        other_tests = _shorten(tests, max(_TEXT_MIN, room - spec_width))
        for shown in (
            (shown_tests, shown_specs),
            (other_tests, _fit_specs(other_tests, specs, spec_width)),
        ):
            apart = len(set(zip(*shown, strict=True)))
            if best is None or apart > best[0]:
                best = (apart, *shown)
        if best is not None and best[0] == cases:
            break
    assert best is not None  # _spec_widths yields at least one
    for cells, test, spec in zip(body, best[1], best[2], strict=True):
        cells[0], cells[1] = test, spec


def _width(values: Sequence[str]) -> int:
    return max(_TEXT_MIN, *(len(v) for v in values))


def _spec_widths(room: int, tests: int, specs: int) -> Iterator[int]:
    """Widths of the spec column: first with the wider column giving way until both are as
    wide; then more or less of the room."""
    half = room // 2
    first = room - tests if tests <= half else specs if specs <= room - half else room - half
    seen: set[int] = set()
    for share in (first, half, room * 2 // 3, room // 3, room * 4 // 5, room // 5):
        spec_width = max(_TEXT_MIN, min(specs, share, room - _TEXT_MIN))
        if spec_width not in seen:
            seen.add(spec_width)
            yield spec_width


def _without_common_module(tests: Sequence[str]) -> list[str]:
    """Test ids without what all share of their module's path: ``suites/test_zero.py::`` when
    every row is a test of that file, else the directories they share (``suites/``)."""
    parts = [test.partition("::") for test in tests]
    if not all(sep for _, sep, _ in parts):
        return list(tests)
    modules = {module for module, _, _ in parts}
    if len(modules) == 1:
        return [name for _, _, name in parts]
    cut = os.path.commonprefix(sorted(modules)).rfind("/") + 1
    return [test[cut:] for test in tests]


def _fit_specs(tests: Sequence[str], specs: Sequence[str], width: int) -> list[str]:
    """The specs at most ``width`` long, those of each (shown) test id kept apart."""
    # Words every spec has tell no row from another: the others are kept first.
    common = set.intersection(*(set(spec.split(" ")) for spec in specs))
    groups: dict[str, list[int]] = {}
    for index, test in enumerate(tests):
        groups.setdefault(test, []).append(index)
    shown = list(specs)
    for indexes in groups.values():
        group = _shorten_specs([specs[i] for i in indexes], width, common)
        for index, spec in zip(indexes, group, strict=True):
            shown[index] = spec
    return shown


def _shorten_specs(specs: Sequence[str], width: int, common: set[str]) -> list[str]:
    """Specs at most ``width`` long, by whole words where they can be: the same first and last
    words of each around ``…`` (``tiny-llama … zero3 offload-optimizer r2``), or only the words
    that tell them apart (``… qlora b1 offload-both``); else cut as ``_shorten`` cuts."""
    if all(len(s) <= width for s in specs):
        return list(specs)
    words = {spec: spec.split(" ") for spec in set(specs)}
    longest = max(len(w) for w in words.values())
    # Showing none of the words that tell rows apart, when there are some, shows nothing.
    telling_any = any(x not in common for w in words.values() for x in w)
    # (how many kept apart, words kept that not every spec has, the model kept, words kept)
    options: list[tuple[tuple[int, int, bool, int], dict[str, str]]] = []
    for head in range(longest):
        for tail in range(1 if head == 0 else 0, longest - head):
            shown = {s: _drop_words(w, head, tail) for s, w in words.items()}
            if all(len(v) <= width for v in shown.values()):
                kept = [x for w in words.values() for x in w[:head] + w[len(w) - tail :]]
                told = sum(1 for x in kept if x not in common)
                if told or not telling_any:
                    options.append(((len(set(shown.values())), told, head > 0, len(kept)), shown))
    bases = [list(specs)]  # to cut as _shorten cuts when no words do
    if len(words) > 1:
        shared = set.intersection(*(set(w) for w in words.values()))
        telling = {s: [x for x in w if x not in shared] for s, w in words.items()}
        if all(telling.values()):
            told_apart = {s: " ".join([_CUT, *w]) for s, w in telling.items()}
            bases.insert(0, [told_apart[s] for s in specs])
            if all(len(v) <= width for v in told_apart.values()):
                options.append(((len(set(told_apart.values())), 0, False, 0), told_apart))
    best = max(options, key=lambda option: option[0], default=None)
    if best is not None and best[0][0] == len(words):
        return [best[1][s] for s in specs]
    # Cut at the start by preference: a spec's last words tell most (zero3 offload-both r8).
    cuts = [_shorten(base, width, head_share=0) for base in bases]
    return max(cuts, key=lambda cut: len(set(cut)))  # the first of those keeping most apart


def _drop_words(words: Sequence[str], head: int, tail: int) -> str:
    if head + tail >= len(words):
        return " ".join(words)
    return " ".join([*words[:head], _CUT, *words[len(words) - tail :]])


_Cut = Callable[[str], str]


def _shorten(
    values: Sequence[str],
    width: int,
    beside: Sequence[str] | None = None,
    head_share: float = 1 / 3,
) -> list[str]:
    """``values`` at most ``width`` long, each longer one cut the same way: its start and its
    end kept around ``…`` (``head_share`` of the width at the start, by preference), or a part
    from within; whichever keeps apart the most rows, a row being a value and the one
    ``beside`` it."""
    if all(len(v) <= width for v in values):
        return list(values)
    rows = sorted(set(zip(values, beside or [""] * len(values), strict=True)))
    best: tuple[int, _Cut] | None = None
    for cut in _cuts(width, sorted({v for v, _ in rows}), int(width * head_share)):
        apart = len({(cut(v), b) for v, b in rows})
        if best is None or apart > best[0]:
            best = (apart, cut)
        if apart == len(rows):
            break
    assert best is not None  # _cuts yields at least one
    return [best[1](v) for v in values]


def _cuts(width: int, values: Sequence[str], preferred: int) -> Iterator[_Cut]:
    """The ways to cut a value to ``width``, the most readable first: its start and end, the
    start ``preferred`` long first; then a part from the start of a word: where the values
    start to differ, then further on."""
    for head in sorted(range(width), key=lambda h: (abs(h - preferred), h)):
        yield functools.partial(_split, head=head, tail=width - 1 - head)
    shared = len(os.path.commonprefix(list(values))) if len(values) > 1 else 0
    words = {i for v in values for i in range(1, len(v) - 1) if v[i - 1] in _SEPARATORS}
    for start in sorted(words, key=lambda i: (i < shared, i))[:_WINDOWS]:
        yield functools.partial(_window, start=start, width=width)


def _split(value: str, head: int, tail: int) -> str:
    if len(value) <= head + 1 + tail:
        return value
    return value[:head] + _CUT + (value[len(value) - tail :] if tail else "")


def _window(value: str, start: int, width: int) -> str:
    if len(value) <= width:
        return value
    if len(value) - start <= width - 1:
        return _CUT + value[len(value) - (width - 1) :]
    return _CUT + value[start : start + width - 2] + _CUT


def write_json(path: Path, summary: Summary, errors: Sequence[str]) -> None:
    """The run as JSON for CI artifacts: every case's row with its full result. Written to a
    temporary file and renamed, so a reader never sees half a report."""
    data = {
        "schema": 1,
        "cases": summary.rows,
        "counts": dict(summary.counts()),
        "unused": summary.unused,
        "errors": list(errors),
    }
    files.write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def junit_properties(row: dict[str, Any], suffix: str = "") -> list[tuple[str, object]]:
    """A case's numbers as junit XML properties (``vram_peak_bytes``, ...), so a CI dashboard
    that reads junit shows them; ``suffix`` tells a test's cases apart (``[label]``)."""
    props: list[tuple[str, object]] = [
        ("vram_label", row["label"]),
        ("vram_peak_bytes", row["peak_bytes"]),
    ]
    for key in ("budget_bytes", "baseline_bytes"):
        if row[key] is not None:
            props.append((f"vram_{key}", row[key]))
    props.append(("vram_verdict", row["status"]))
    return [(f"{name}{suffix}", value) for name, value in props]


def benchmark_entries(summary: Summary) -> list[dict[str, Any]]:
    """github-action-benchmark's "customSmallerIsBetter": one entry per case, in bytes."""
    return [
        {
            "name": f"{row['test']} [{row['label']}]",
            "unit": "bytes",
            "value": row["peak_bytes"],
            "extra": f"verdict {row['status']}; meter {row['result']['meter']}",
        }
        for row in summary.rows
    ]


def write_benchmark_json(path: Path, summary: Summary) -> None:
    files.write_text(path, json.dumps(benchmark_entries(summary), indent=1) + "\n")
