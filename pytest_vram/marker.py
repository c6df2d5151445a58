"""The ``vram_budget`` marker: its arguments, validated at collection."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final, final

from pytest_vram.spec import FIELDS, SpecError, check_field

__all__ = ["MARKER", "MarkerArgs", "check_capacity", "check_device", "parse_marker"]

MARKER: Final = "vram_budget"
_OWN: Final = ("gb", "tolerance", "leak_tolerance", "capacity_gb", "device")


@final
@dataclasses.dataclass(frozen=True)
class MarkerArgs:
    gb: float
    tolerance: float | None
    leak_tolerance: float
    # StepSpec fields given in the marker are the defaults of vram.step() in that test.
    spec_defaults: Mapping[str, Any]
    capacity_gb: float | None = None  # the device's memory: a peak above it is a predicted OOM
    device: str | None = None  # the meter for this test's cases, e.g. "fake" for real sizes


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{name}={value!r} must be a number")
    return float(value)


def _fraction(name: str, kwargs: Mapping[str, Any]) -> float:
    value = _number(name, kwargs[name])
    if value < 0:
        raise SpecError(f"{name}={kwargs[name]!r} must be >= 0 (0.05 is 5%)")
    return value


def parse_marker(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> MarkerArgs:
    if args:
        raise SpecError(f"takes keyword arguments only, got positional {args!r}; write gb=...")
    if "gb" not in kwargs:
        raise SpecError("gb is missing: write @pytest.mark.vram_budget(gb=<GiB>)")
    gb = _number("gb", kwargs["gb"])
    if gb <= 0:
        raise SpecError(f"gb={kwargs['gb']!r} must be > 0 (GiB)")
    tolerance = _fraction("tolerance", kwargs) if "tolerance" in kwargs else None
    leak_tolerance = _fraction("leak_tolerance", kwargs) if "leak_tolerance" in kwargs else 0.0
    capacity = check_capacity(kwargs["capacity_gb"]) if "capacity_gb" in kwargs else None
    device = check_device(kwargs["device"]) if "device" in kwargs else None
    defaults: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _OWN:
            continue
        if name not in FIELDS:
            known = ", ".join((*_OWN, *FIELDS))
            raise SpecError(f"unknown keyword {name}={value!r}; known: {known}")
        defaults[name] = check_field(name, value)
    if "model" in defaults:
        # A complete spec: combinations (an optimizer a method cannot use) fail here too.
        from pytest_vram.spec import StepSpec

        StepSpec.from_kwargs(**defaults)
    return MarkerArgs(gb, tolerance, leak_tolerance, defaults, capacity, device)


def check_capacity(value: object) -> float:
    capacity = _number("capacity_gb", value)
    if capacity <= 0:
        raise SpecError(f"capacity_gb={value!r} must be > 0 (GiB of device memory)")
    return capacity


def check_device(value: object) -> str:
    from pytest_vram.meters import METERS

    if value not in METERS:
        raise SpecError(f"device={value!r}; choose one of: {', '.join(METERS)}")
    return str(value)
