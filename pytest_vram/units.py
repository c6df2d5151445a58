"""Sizes and tolerances as users write them, and byte counts as messages print them.

Torch-free and pure: the pytest process parses marker arguments and options with these at
collection, and the verdict prints its numbers with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Final

from pytest_vram.errors import SpecError

__all__ = [
    "BINARY_UNITS",
    "column_unit",
    "format_bytes",
    "format_gib",
    "format_in",
    "format_pair",
    "parse_fraction",
    "parse_size",
]

GIB: Final = 2**30
# Binary units only: a GPU maker's "24 GB" card holds 24 GiB while SI's 24 GB is 24e9 bytes,
# and the two readings differ by 7.4%, more than the default tolerance; so "GB" is refused
# with both spellings that are not ambiguous (see _DECIMAL).
BINARY_UNITS: Final = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_UNITS_BY_KEY: Final = {unit.lower(): (unit, size) for unit, size in BINARY_UNITS.items()}
_DECIMAL: Final = {"k": "KiB", "m": "MiB", "g": "GiB", "t": "TiB"}
# A budget is stored as JSON and compared as int64 by readers of the report: keep below that.
MAX_BYTES: Final = 2**63 - 1
_SIZE: Final = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")
_UNITS_TEXT: Final = ", ".join(BINARY_UNITS)


def parse_size(name: str, value: object) -> int:
    """Bytes of a size argument such as ``gb=``: a number is GiB; a string has its unit,
    ``"512MiB"``, ``"24GiB"``, ``"0.5 GiB"`` (B, KiB, MiB, GiB, TiB). A fraction of a byte is
    dropped, as ``int(gb * 2**30)`` always did."""
    if isinstance(value, str):
        return _parse_size_text(name, value)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise SpecError(
            f"{name}={value!r} must be a number (GiB) or a size with its unit, e.g. '512MiB'"
        )
    # An int is multiplied exactly; a float times 2**30 is exact too (a power of two).
    return _checked(name, value, value * GIB, "GiB")


def _parse_size_text(name: str, text: str) -> int:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise SpecError(
            f"{name}={text!r} is not a size: write a number (GiB) or a number with its unit, "
            f"e.g. '512MiB', '24GiB' (units: {_UNITS_TEXT})"
        )
    number, unit = match.group(1), match.group(2)
    if not unit:
        raise SpecError(
            f"{name}={text!r} has no unit: write {number} (a number: GiB) or '{number}GiB'"
        )
    known = _UNITS_BY_KEY.get(unit.lower())
    if known is None:
        binary = _DECIMAL.get(unit.lower().removesuffix("b"))
        if binary is not None:
            raise SpecError(
                f"{name}={text!r}: {unit} is ambiguous (a GPU's '24GB' is 24 GiB, SI's is 24e9 "
                f"bytes): write '{number}{binary}' ({binary} = 2**{_power(binary)} bytes) "
                f"or bytes, '{_in_bytes(number, binary)}'"
            )
        raise SpecError(f"{name}={text!r}: unknown unit {unit!r}; units: {_UNITS_TEXT}")
    spelled, size = known
    return _checked(name, text, float(number) * size, spelled)


def _power(unit: str) -> int:
    return int(math.log2(BINARY_UNITS[unit]))


def _in_bytes(number: str, unit: str) -> str:
    """What the decimal reading of ``number`` ``unit`` (e.g. "24" "GiB" as 24 GB) is in bytes."""
    exponent = 3 * (1 + "KMGT".index(unit[0]))
    if "e" in number.lower():
        return f"{float(number) * 10**exponent:g}B"
    return f"{number}e{exponent}B"


def _checked(name: str, value: object, nbytes: float, unit: str) -> int:
    # ints are compared as they are: math.isfinite() cannot convert a huge one
    if (isinstance(nbytes, float) and not math.isfinite(nbytes)) or nbytes > MAX_BYTES:
        raise SpecError(f"{name}={value!r} is too large (at most 8 EiB)")
    whole = int(nbytes)
    if whole <= 0:
        # gb=0 and gb=-1 were refused with this text before unit strings existed.
        raise SpecError(f"{name}={value!r} must be > 0 ({unit})")
    return whole


def parse_fraction(name: str, value: object) -> float:
    """A tolerance: a fraction of 1 or less (``0.05``) or a percentage string (``"5%"``).

    A fraction above 1 is refused: ``--vram-tolerance 5`` meant 5%, never 500%."""
    if isinstance(value, str):
        text = value.strip()
        percent = text.endswith("%")
        try:
            number = float(text.removesuffix("%").strip())
        except ValueError:
            raise SpecError(
                f"{name}={value!r} is not a number: write a fraction (0.05) or a percentage ('5%')"
            ) from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name}={value!r} must be a fraction (0.05) or a percentage ('5%')")
    else:
        percent = False
        try:
            number = float(value)
        except OverflowError:  # an int beyond floats: certainly above 1
            number = math.inf
    if math.isnan(number):
        raise SpecError(f"{name}={value!r} must be a fraction (0.05) or a percentage ('5%')")
    if number < 0:
        raise SpecError(f"{name}={value!r} must be >= 0 (0.05 is 5%)")
    if percent:
        if number > 100:
            raise SpecError(f"{name}={value!r} must be 100% or less")
        return number / 100
    if number > 1:
        # Most likely a percentage written as a number: suggest it both ways.
        fraction, shown = (number / 100, f"{number:g}") if number <= 100 else (0.05, "5")
        raise SpecError(
            f"{name}={value!r} is more than 1: write a fraction of 1 or less ({fraction:g}) "
            f"or a percentage ('{shown}%')"
        )
    return number


# -- printing bytes -----------------------------------------------------------------------

_DIGITS: Final = 4  # significant digits, before a pair needs more
_MAX_DECIMALS: Final = 12  # a 1-byte difference shows at GiB from 10 decimals


def _unit(nbytes: int) -> tuple[str, int]:
    size = abs(nbytes)
    for unit in ("GiB", "MiB", "KiB"):
        if size >= BINARY_UNITS[unit]:
            return unit, BINARY_UNITS[unit]
    return "B", 1


def _decimals(nbytes: int, scale: int) -> int:
    if scale == 1:
        return 0
    value = abs(nbytes) / scale
    return max(0, _DIGITS - 1 - math.floor(math.log10(value))) if value else _DIGITS - 1


def _render(nbytes: int, unit: str, scale: int, decimals: int, sign: bool) -> str:
    text = f"{nbytes:,d}" if scale == 1 else f"{nbytes / scale:.{decimals}f}"
    if sign and nbytes >= 0:
        text = "+" + text
    return f"{text} {unit}"


def format_bytes(nbytes: int, *, sign: bool = False) -> str:
    """``nbytes`` in B below 1 KiB, KiB below 1 MiB, MiB below 1 GiB, else GiB, with four
    significant digits (``"10.24 MiB"``, ``"24.00 GiB"``); ``sign`` adds ``+`` to a positive."""
    unit, scale = _unit(nbytes)
    return _render(nbytes, unit, scale, _decimals(nbytes, scale), sign)


def _apart(values: Sequence[int], scale: int, decimals: int) -> int | None:
    """The fewest decimals from ``decimals`` at which values that differ print differently in
    units of ``scale``; None beyond a float's precision."""
    distinct = set(values)
    while decimals <= _MAX_DECIMALS:
        if len({_render(v, "", scale, decimals, False) for v in distinct}) == len(distinct):
            return decimals
        decimals += 1
    return None


def format_pair(first: int, second: int) -> tuple[str, str]:
    """Two byte counts as one message prints them side by side: each in its own unit when one
    is at least twice the other; else both in the larger's unit, with digits added until two
    that differ print differently (a peak 1 byte over its budget must not read as equal)."""
    low, high = sorted((abs(first), abs(second)))
    if high >= 2 * low:
        return format_bytes(first), format_bytes(second)
    unit, scale = _unit(high)
    decimals = _apart((first, second), scale, _decimals(high, scale))
    if decimals is None:  # the byte counts
        return f"{first:,d} B", f"{second:,d} B"
    return (
        _render(first, unit, scale, decimals, False),
        _render(second, unit, scale, decimals, False),
    )


def format_gib(values: Sequence[int | None], decimals: int = 3) -> list[str]:
    """Byte counts as bare GiB numbers for a column headed GiB (None as ``-``): ``decimals``
    places, or as many more as tell apart any two of them that differ."""
    return format_in(values, "GiB", decimals)


def format_in(values: Sequence[int | None], unit: str, decimals: int = 3) -> list[str]:
    """``format_gib`` in another unit of ``BINARY_UNITS``, for a column headed with it."""
    scale = BINARY_UNITS[unit]
    given = [v for v in values if v is not None]
    places = _apart(given, scale, decimals)
    places = _MAX_DECIMALS if places is None else places
    return ["-" if v is None else f"{v / scale:.{places}f}" for v in values]


def column_unit(values: Iterable[int | None]) -> str:
    """The one unit of a table's columns of sizes: GiB when any reaches 1 GiB, else MiB, so a
    tiny model's 20 MiB peak reads ``20.480``, not ``0.020``."""
    return "GiB" if any(v is not None and abs(v) >= GIB for v in values) else "MiB"
