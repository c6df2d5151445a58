"""Generated input for everything a user writes: marker keywords, vram.step() fields, sizes,
tolerances, options. Each call returns, or raises the plugin's own error (SpecError; a
pytest.UsageError for options) naming the bad value; never another exception."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_vram.errors import SpecError
from pytest_vram.marker import (
    STEP_OWN,
    check_capacity,
    check_device,
    check_step_names,
    parse_marker,
)
from pytest_vram.options import OPTIONS
from pytest_vram.spec import FIELDS, StepSpec
from pytest_vram.units import MAX_BYTES, format_bytes, format_pair, parse_fraction, parse_size

FUZZ = settings(max_examples=200, deadline=None)
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
