"""Sizes and tolerances as written in markers and options, and byte counts as messages print
them: ``pytest_vram.units`` is pure, so it is tested directly."""

from __future__ import annotations

import pytest

from pytest_vram.errors import SpecError
from pytest_vram.marker import parse_marker
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.units import format_bytes, format_pair, parse_fraction, parse_size
from pytest_vram.verdict import Budget, judge

GIB = 2**30
MIB = 2**20


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        (1, GIB),
        (0.25, GIB // 4),
        (0.01, int(0.01 * GIB)),  # a number is GiB, truncated to whole bytes as before
        ("512MiB", 512 * MIB),
        ("24GiB", 24 * GIB),
        ("0.5 GiB", GIB // 2),
        (" 2 TiB ", 2 * 2**40),
        ("64KiB", 64 * 1024),
        ("24e9B", 24 * 10**9),  # the decimal reading of "24 GB", written out in bytes
        ("1.5gib", 3 * GIB // 2),  # a binary unit is unambiguous in any case
    ],
)
def test_sizes_are_gib_numbers_or_strings_with_a_binary_unit(value: object, nbytes: int) -> None:
    assert parse_size("gb", value) == nbytes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "24GB",
            "gb='24GB': GB is ambiguous (a GPU's '24GB' is 24 GiB, SI's is 24e9 bytes): "
            "write '24GiB' (GiB = 2**30 bytes) or bytes, '24e9B'",
        ),
        (
            "512 MB",
            "gb='512 MB': MB is ambiguous (* write '512MiB' (MiB = 2**20 bytes) or bytes, '512e6B'",
        ),
        ("2T", "gb='2T': T is ambiguous (* write '2TiB' *"),
        ("24", "gb='24' has no unit: write 24 (a number: GiB) or '24GiB'"),
        ("24 parsecs", "gb='24 parsecs': unknown unit 'parsecs'; units: B, KiB, MiB, GiB, TiB"),
        ("big", "gb='big' is not a size: write a number (GiB) or a number with its unit, *"),
        (0, "gb=0 must be > 0 (GiB)"),
        (-1, "gb=-1 must be > 0 (GiB)"),
        ("0MiB", "gb='0MiB' must be > 0 (MiB)"),
        ("0.5B", "gb='0.5B' must be > 0 (B)"),  # less than a byte
        (True, "gb=True must be a number (GiB) or a size with its unit, e.g. '512MiB'"),
        (float("nan"), "gb=nan must be a number (GiB) *"),
        (float("inf"), "gb=inf must be a number (GiB) *"),
        (None, "gb=None must be a number (GiB) *"),
        ("1e400GiB", "gb='1e400GiB' is too large (at most 8 EiB)"),
        (2**40, f"gb={2**40} is too large (at most 8 EiB)"),  # 2**70 bytes
        (10**400, "gb=1000* is too large (at most 8 EiB)"),  # beyond a float: no OverflowError
    ],
)
def test_bad_sizes_name_the_value_and_what_to_write(value: object, message: str) -> None:
    import fnmatch

    with pytest.raises(SpecError) as info:
        parse_size("gb", value)
    assert fnmatch.fnmatchcase(str(info.value), message), str(info.value)


@pytest.mark.parametrize(
    ("value", "fraction"),
    [
        (0.05, 0.05),
        (0, 0.0),
        (1, 1.0),
        ("5%", 0.05),
        (" 2.5 % ", 0.025),
        ("100%", 1.0),
        ("0.1", 0.1),
    ],
)
def test_tolerances_are_fractions_or_percentages(value: object, fraction: float) -> None:
    assert parse_fraction("tolerance", value) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            5,
            "tolerance=5 is more than 1: write a fraction of 1 or less (0.05) or a percentage ('5%')",
        ),
        (
            "20",
            "tolerance='20' is more than 1: write a fraction of 1 or less (0.2) or a percentage ('20%')",
        ),
        (
            500,
            "tolerance=500 is more than 1: write a fraction of 1 or less (0.05) or a percentage ('5%')",
        ),
        ("150%", "tolerance='150%' must be 100% or less"),
        (-0.1, "tolerance=-0.1 must be >= 0 (0.05 is 5%)"),
        ("-5%", "tolerance='-5%' must be >= 0 (0.05 is 5%)"),
        (
            "five",
            "tolerance='five' is not a number: write a fraction (0.05) or a percentage ('5%')",
        ),
        ("nan%", "tolerance='nan%' must be a fraction (0.05) or a percentage ('5%')"),
        (True, "tolerance=True must be a fraction (0.05) or a percentage ('5%')"),
        ([0.05], "tolerance=[0.05] must be a fraction (0.05) or a percentage ('5%')"),
    ],
)
def test_bad_tolerances_suggest_both_spellings(value: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_fraction("tolerance", value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1,023 B"),
        (1536, "1.500 KiB"),
        (int(0.01 * GIB), "10.24 MiB"),
        (62 * MIB + MIB // 2, "62.50 MiB"),
        (GIB - 1, "1024 MiB"),
        (GIB, "1.000 GiB"),
        (24 * GIB, "24.00 GiB"),
        (-5 * MIB, "-5.000 MiB"),
    ],
)
def test_format_bytes_picks_the_unit_and_four_significant_digits(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text


def test_format_bytes_can_sign_a_delta() -> None:
    assert format_bytes(3 * MIB, sign=True) == "+3.000 MiB"
    assert format_bytes(-3 * MIB, sign=True) == "-3.000 MiB"
    assert format_bytes(0, sign=True) == "+0 B"


@pytest.mark.parametrize(
    ("first", "second", "texts"),
    [
        # the example: gb=0.01 and a peak 3.9% above it read "0.010 GiB" both
        (int(0.01 * GIB * 1.039), int(0.01 * GIB), ("10.64 MiB", "10.24 MiB")),
        (GIB + 1, GIB, ("1.000000001 GiB", "1.000000000 GiB")),
        (GIB + 5, 1023 * MIB, ("1.000 GiB", "0.999 GiB")),  # one unit, never 1.000 vs 1023
        (3 * GIB, 100 * MIB, ("3.000 GiB", "100.0 MiB")),  # far apart: each its own unit
        (2**62 + 1, 2**62, ("4,611,686,018,427,387,905 B", "4,611,686,018,427,387,904 B")),
        (5 * MIB, 5 * MIB, ("5.000 MiB", "5.000 MiB")),
    ],
)
def test_format_pair_adds_digits_until_different_numbers_differ(
    first: int, second: int, texts: tuple[str, str]
) -> None:
    assert format_pair(first, second) == texts


# -- in the marker --------------------------------------------------------------------------


def test_marker_takes_unit_strings_and_percentages() -> None:
    args = parse_marker(
        (), {"gb": "512MiB", "capacity_gb": "24GiB", "tolerance": "2%", "leak_tolerance": "1%"}
    )
    assert args.budget_bytes == 512 * MIB
    assert args.capacity_bytes == 24 * GIB
    assert args.tolerance == pytest.approx(0.02)
    assert args.leak_tolerance == pytest.approx(0.01)
    plain = parse_marker((), {"gb": 0.25, "capacity_gb": 24, "tolerance": 0.05})
    assert (plain.budget_bytes, plain.capacity_bytes, plain.tolerance) == (GIB // 4, 24 * GIB, 0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"gb": 1, "tolerance": 5},
            "tolerance=5 is more than 1: write a fraction of 1 or less (0.05) or a percentage ('5%')",
        ),
        (
            {"gb": 1, "leak_tolerance": 2},
            "leak_tolerance=2 is more than 1: write a fraction of 1 or less (0.02) or a percentage ('2%')",
        ),
        ({"gb": 1, "capacity_gb": "24GB"}, "capacity_gb='24GB': GB is ambiguous *"),
        ({"gb": 1, "capacity_gb": 0}, "capacity_gb=0 must be > 0 (GiB of device memory)"),
    ],
)
def test_marker_sizes_and_tolerances_name_the_argument(
    kwargs: dict[str, object], message: str
) -> None:
    import fnmatch

    with pytest.raises(SpecError) as info:
        parse_marker((), kwargs)
    assert fnmatch.fnmatchcase(str(info.value), message), str(info.value)


# -- in the verdict's messages --------------------------------------------------------------


def measured(peak: int, steps: tuple[int, ...] = ()) -> MemoryResult:
    breakdown = Breakdown(activation_bytes=peak)
    return MemoryResult("case", "host", "host-cpu", peak, steps or (peak, peak), breakdown)


def reasons(
    peak: int,
    *,
    budget: int | None = None,
    baseline: int | None = None,
    capacity: int | None = None,
    steps: tuple[int, ...] = (),
) -> list[str]:
    result = measured(peak, steps)
    base = measured(baseline) if baseline is not None else result
    verdict = judge(
        "t::x",
        result,
        Budget(budget, 0.01),
        base,
        strict=True,
        update=False,
        record_hint="",
        capacity_bytes=capacity,
    )
    return list(verdict.reasons)


def test_a_peak_over_a_small_budget_does_not_print_as_equal_to_it() -> None:
    # gb=0.01: this read "peak 0.010 GiB exceeds budget 0.010 GiB (+3.9%)"
    budget = int(0.01 * GIB)
    assert reasons(int(budget * 1.039), budget=budget) == [
        "peak 10.64 MiB exceeds budget 10.24 MiB (+3.9%) [case]"
    ]
    assert reasons(GIB + 1, budget=GIB) == [
        "peak 1.000000001 GiB exceeds budget 1.000000000 GiB (+0.0%) [case]"
    ]


def test_drift_capacity_and_leak_messages_print_distinct_numbers() -> None:
    (drift,) = reasons(int(0.0104 * GIB), baseline=int(0.01 * GIB))
    assert drift.startswith(
        "peak 10.65 MiB is +4.0% (+419.4 KiB) from baseline 10.24 MiB, beyond tolerance 1.0% [case]"
    ), drift
    (oom,) = reasons(24 * GIB + 3 * MIB, capacity=24 * GIB)
    assert oom == (
        "out of memory predicted: peak 24.003 GiB exceeds the device's 24.000 GiB by "
        "3.000 MiB (+0.0%) [case]"
    )
    (leak,) = reasons(GIB + MIB, steps=(GIB // 2, GIB, GIB + MIB))
    assert leak.startswith("peak grew from 1.000 GiB at step 2 to 1.001 GiB at step 3 (+0.10%"), (
        leak
    )
