"""Generated input for everything a user writes: marker keywords, vram.step() fields, sizes,
tolerances, options (command line and ini), baseline files. Each call returns, or raises the
plugin's own error (SpecError; a pytest.UsageError for options; a BaselineError naming the file
for baseline files) naming the bad value; never another exception."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from baseline_docs import GOOD
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import LABEL
from pytest_vram.baselines import BaselineError, BaselineStore
from pytest_vram.errors import SpecError
from pytest_vram.marker import (
    STEP_OWN,
    check_capacity,
    check_device,
    check_step_names,
    parse_marker,
)
from pytest_vram.options import OPTIONS, resolve
from pytest_vram.result import MemoryResult
from pytest_vram.spec import FIELDS, StepSpec
from pytest_vram.units import MAX_BYTES, format_bytes, format_pair, parse_fraction, parse_size

FUZZ = settings(max_examples=200, deadline=None)
# Each baseline-file example reads and writes a file under the write lock (about 15 ms).
FILES = settings(max_examples=100, deadline=None)
OWN = ("gb", "tolerance", "leak_tolerance", "capacity_gb", "device")

# Values a user could plausibly write, and ones that break careless parsing.
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 5, 100, 2**63, 10**400, -(10**400), -0.0, 1e308, 5e-324]),
)
UNIT_TEXT = st.builds(
    lambda number, space, unit: f"{number}{space}{unit}",
    st.one_of(
        st.integers(-(10**20), 10**20).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["1e400", ".5", "5.", "1_000", "0x10", "", "-"]),
    ),
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(
        ["B", "KiB", "MiB", "GiB", "TiB", "gib", "GB", "MB", "kb", "Gb", "G", "T", "%", "", "x"]
    ),
)
NAMES = st.sampled_from(
    [
        "tiny-llama",
        "qwen2-vl-7b",
        "lora",
        "qlora",
        "lora+",
        "prefix",
        "galore-adamw",
        "adamw-8bit",
        "lomo",
        "fp16",
        "amp-bf16",
        "dpo",
        "eager",
        "optimizer",
        "param",
        "both",
        "fake",
        "cuda",
    ]
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), UNIT_TEXT, NAMES)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), NAMES), inner, max_size=3),
    ),
    max_leaves=6,
)


def parts(value: object) -> Iterator[str]:
    """How a message may name ``value``: its repr or str, or those of a part of it (an options
    mapping's bad key, one bad element)."""
    yield repr(value)
    if str(value):
        yield str(value)
    if isinstance(value, dict):
        for key, item in value.items():
            yield from parts(key)
            yield from parts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from parts(item)


def assert_named(exc: BaseException, value: object) -> None:
    message = str(exc)
    assert any(part in message for part in parts(value)), (message, value)


@FUZZ
@given(name=st.sampled_from(OWN), value=VALUES)
def test_marker_arguments(name: str, value: object) -> None:
    kwargs: dict[str, Any] = {"gb": 1, name: value}
    try:
        args = parse_marker((), kwargs)
    except SpecError as exc:
        assert f"{name}=" in str(exc)
        assert_named(exc, value)
    else:
        assert 0 < args.budget_bytes <= MAX_BYTES
        assert args.tolerance is None or 0 <= args.tolerance <= 1
        assert 0 <= args.leak_tolerance <= 1


@FUZZ
@given(name=st.sampled_from(FIELDS), value=VALUES, in_marker=st.booleans())
# Found by this test: option pairs whose name is a list, which dict() cannot key.
@example(name="method_options", value=((None, None), ([], None)), in_marker=False)
def test_step_fields(name: str, value: object, in_marker: bool) -> None:
    kwargs: dict[str, Any] = {"model": "tiny-llama", name: value}
    try:
        if in_marker:
            parse_marker((), {"gb": 1, **kwargs})
        else:
            StepSpec.from_kwargs(**kwargs)
    except SpecError as exc:
        assert_named(exc, value)


@FUZZ
@given(name=st.text(min_size=1, max_size=12), value=VALUES)
def test_unknown_keywords_are_named(name: str, value: object) -> None:
    known = (*OWN, *FIELDS)
    try:
        parse_marker((), {"gb": 1, name: value})
    except SpecError as exc:
        if name not in known:
            assert f"unknown keyword {name}={value!r}" in str(exc)
    else:
        assert name in known
    try:
        check_step_names([name])
    except SpecError as exc:
        assert name not in (*FIELDS, *STEP_OWN)
        assert f"unknown step argument {name!r}" in str(exc)


@FUZZ
@given(value=VALUES)
def test_sizes_tolerances_capacity_and_device(value: object) -> None:
    for parse in (
        lambda v: parse_size("gb", v),
        lambda v: parse_fraction("tolerance", v),
        check_capacity,
        check_device,
    ):
        try:
            parse(value)
        except SpecError as exc:
            assert_named(exc, value)


@FUZZ
@given(text=st.one_of(st.text(max_size=12), UNIT_TEXT, NUMBERS.map(str)))
def test_tolerance_and_timeout_options(text: str) -> None:
    for opt in OPTIONS:
        if opt.flag not in ("--vram-tolerance", "--vram-timeout"):
            continue
        try:
            value = opt.parse(text)
        except pytest.UsageError as exc:
            assert opt.flag in str(exc) and repr(text) in str(exc), str(exc)
        else:
            assert value >= 0 and (opt.flag != "--vram-tolerance" or value <= 1)


# Pairs near each other (a peak just over its budget) and far apart, at every magnitude.
NEAR = st.tuples(st.integers(0, MAX_BYTES - 2**20), st.integers(0, 2**20)).map(
    lambda pair: (pair[0], pair[0] + pair[1])
)
FAR = st.tuples(st.integers(0, MAX_BYTES), st.integers(0, MAX_BYTES))
SCALED = st.tuples(st.integers(0, 60), st.integers(1, 2**20), st.integers(-3, 3)).map(
    lambda t: (2 ** t[0] * t[1], max(0, 2 ** t[0] * t[1] + t[2]))
)


@FUZZ
@given(pair=st.one_of(NEAR, FAR, SCALED))
def test_two_different_byte_counts_never_print_the_same(pair: tuple[int, int]) -> None:
    first, second = pair
    shown = format_pair(first, second)
    assert (shown[0] == shown[1]) == (first == second), shown
    assert format_bytes(first) and format_bytes(second - first, sign=True)


@FUZZ
@given(opt=st.sampled_from(OPTIONS), text=st.one_of(st.text(max_size=12), UNIT_TEXT, NAMES))
def test_ini_options(opt: Any, text: str) -> None:
    """The ini twin of every option: a bad value names the ini key and the value."""

    class Config:
        rootpath = Path("/project")
        invocation_params = pytest.Config.InvocationParams(args=(), plugins=None, dir=rootpath)

        def getoption(self, name: str) -> None:
            return None  # not on the command line: the ini value is read

        def getini(self, name: str) -> str | None:
            return text if name == opt.ini else None

    try:
        resolve(Config())  # type: ignore[arg-type]
    except pytest.UsageError as exc:
        assert f"ini {opt.ini} = {text!r}: " in str(exc), str(exc)


# -- baseline files ----------------------------------------------------------------------------
#
# A hand edit or a bad merge can leave anything in a baseline file. Reading it (a lookup) and
# writing it (a refresh of another test) either work or raise BaselineError naming the file;
# an invalid entry never stops the others, and a write never drops it.

MODULE = "test_mem.py"
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _places(value: object, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path to every value inside ``value`` (dict keys and list indexes)."""
    yield at
    items: list[tuple[Any, object]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        yield from _places(item, (*at, key))


PLACES = [place for place in _places(GOOD) if place]


def _file(text: str | bytes) -> tuple[Path, BaselineStore, tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="vram-fuzz-")
    store = BaselineStore(Path(tmp.name), "host-cpu")
    path = store.path_for(MODULE)
    path.parent.mkdir(parents=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, "utf-8")
    return path, store, tmp


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)  # NaN, tuples and key order compare as written


@FILES
@given(place=st.sampled_from(PLACES), value=JSON, delete=st.booleans())
def test_baseline_entries(place: tuple[Any, ...], value: object, delete: bool) -> None:
    """One entry of a valid file spoilt anywhere: its lookup fails naming the file, the other
    test's works, and a refresh of the other test keeps the spoilt entry as it was."""
    spoilt = copy.deepcopy(GOOD)
    parent = spoilt
    for key in place[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[place[-1]]
    else:
        parent[place[-1]] = value
    doc = {"schema": 1, "device": "host-cpu", "entries": {"test_a": {LABEL: spoilt}}}
    doc["entries"]["test_b"] = {LABEL: GOOD}
    path, store, tmp = _file(json.dumps(doc))
    with tmp:
        try:
            valid = store.get(MODULE, "test_a", LABEL) is not None
        except BaselineError as exc:
            assert str(path) in str(exc) and "test_a" in str(exc), str(exc)
            valid = False
        assert store.get(MODULE, "test_b", LABEL) == MemoryResult.from_dict(GOOD)
        merge = store.write(MODULE, {"test_b": {LABEL: GOOD}}, {"test_a": None})
        after = json.loads(path.read_text("utf-8"))["entries"]
        if valid:
            assert merge.removed == 1 and "test_a" not in after
        else:
            assert [(i.test, i.label) for i in merge.kept] == [("test_a", LABEL)]
            assert _canonical(after["test_a"][LABEL]) == _canonical(spoilt)


VALID = json.dumps({"schema": 1, "device": "host-cpu", "entries": {"test_b": {LABEL: GOOD}}})
DOCUMENTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "schema": st.one_of(st.just(1), JSON),
            "device": st.one_of(st.just("host-cpu"), JSON),
            "entries": st.one_of(
                JSON,
                st.dictionaries(st.text(max_size=8), JSON, max_size=3),
                st.dictionaries(
                    st.text(max_size=8),
                    st.dictionaries(st.one_of(st.just(LABEL), st.text(max_size=8)), JSON),
                    max_size=3,
                ),
            ),
        },
        optional={"extra": JSON},
    ),
)
TEXTS = st.one_of(
    DOCUMENTS.map(json.dumps),
    st.integers(0, len(VALID) - 1).map(lambda cut: VALID[:cut]),  # a write cut short
    st.text(max_size=40),
    st.binary(max_size=40),
)


@FILES
@given(text=TEXTS)
def test_baseline_documents(text: str | bytes) -> None:
    """Any file content: readable, or an error of each lookup naming the file; a file that
    cannot be read is never written."""
    path, store, tmp = _file(text)
    with tmp:
        before = path.read_bytes()
        try:
            store.load(MODULE)
        except BaselineError as exc:
            assert str(path) in str(exc), str(exc)
            readable = False
        else:
            readable = True
        for test in ("test_a", "test_b"):
            try:
                store.get(MODULE, test, LABEL)
            except BaselineError as exc:
                assert str(path) in str(exc), str(exc)
        try:
            store.write(MODULE, {"test_new": {LABEL: GOOD}}, {"test_b": None})
        except BaselineError as exc:
            assert not readable and str(path) in str(exc), str(exc)
            assert path.read_bytes() == before
        else:
            assert readable
            fresh = BaselineStore(store.root, "host-cpu")
            assert fresh.get(MODULE, "test_new", LABEL) == MemoryResult.from_dict(GOOD)
