"""The ``vram_budget`` marker: its arguments, validated at collection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

from pytest_vram.errors import SpecError
from pytest_vram.spec import FIELDS, StepSpec, check_field, unknown_name
from pytest_vram.units import parse_fraction, parse_size

__all__ = [
    "MARKER",
    "STEP_OWN",
    "MarkerArgs",
    "check_capacity",
    "check_device",
    "check_step_names",
    "parse_marker",
]

MARKER: Final = "vram_budget"
_OWN: Final = ("gb", "tolerance", "leak_tolerance", "capacity_gb", "device")
# What vram.step() takes besides the StepSpec fields.
STEP_OWN: Final = ("device", "capacity_gb")


@final
@dataclasses.dataclass(frozen=True)
class MarkerArgs:
    budget_bytes: int
    tolerance: float | None
    leak_tolerance: float
    # StepSpec fields given in the marker are the defaults of vram.step() in that test.
    spec_defaults: Mapping[str, Any]
    capacity_bytes: int | None = None  # the device's memory: a peak above it is a predicted OOM
    device: str | None = None  # the meter for this test's cases, e.g. "fake" for real sizes


def parse_marker(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> MarkerArgs:
    if args:
        raise SpecError(f"takes keyword arguments only, got positional {args!r}; write gb=...")
    # An unknown keyword first: a misspelt gb= would otherwise read as "gb is missing".
    known = (*_OWN, *FIELDS)
    for name, value in kwargs.items():
        if name not in known:
            raise unknown_name(f"keyword {name}={value!r}", name, known)
    if "gb" not in kwargs:
        raise SpecError("gb is missing: write @pytest.mark.vram_budget(gb=<GiB>)")
    budget = parse_size("gb", kwargs["gb"])
    tolerance = parse_fraction("tolerance", kwargs["tolerance"]) if "tolerance" in kwargs else None
    leak = (
        parse_fraction("leak_tolerance", kwargs["leak_tolerance"])
        if "leak_tolerance" in kwargs
        else 0.0
    )
    capacity = check_capacity(kwargs["capacity_gb"]) if "capacity_gb" in kwargs else None
    device = check_device(kwargs["device"]) if "device" in kwargs else None
    defaults = {n: check_field(n, v) for n, v in kwargs.items() if n not in _OWN}
    if "model" in defaults:
        # A complete spec: combinations (an optimizer a method cannot use) fail here too.
        StepSpec.from_kwargs(**defaults)
    return MarkerArgs(budget, tolerance, leak, defaults, capacity, device)


def check_step_names(names: Iterable[str]) -> None:
    """vram.step()'s keywords: an unknown one is named, with the closest known one."""
    known = (*FIELDS, *STEP_OWN)
    for name in names:
        if name not in known:
            raise unknown_name(f"step argument {name!r}", name, known)


def check_capacity(value: object) -> int:
    """Bytes of device memory from ``capacity_gb=``: GiB, or a size string such as '24GiB'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise SpecError(f"capacity_gb={value!r} must be > 0 (GiB of device memory)")
    return parse_size("capacity_gb", value)


def check_device(value: object) -> str:
    from pytest_vram.meters import METERS

    if not isinstance(value, str) or value not in METERS:
        raise SpecError(f"device={value!r}; choose one of: {', '.join(METERS)}")
    return value
