"""The ``vram_budget`` marker: its arguments, validated at collection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

from pytest_vram.errors import SpecError
from pytest_vram.spec import FIELDS, StepSpec, check_field, unknown_name
from pytest_vram.units import parse_fraction, parse_size

__all__ = [
    "KEYWORDS",
    "MARKER",
    "OWN_KEYWORDS",
    "STEP_OWN",
    "MarkerArgs",
    "check_capacity",
    "check_device",
    "check_ranks",
    "check_step_names",
    "help_line",
    "parse_marker",
]

MARKER: Final = "vram_budget"
# The marker's own keywords and what each means; the help line is built from this, so a
# keyword parse_marker accepts is a keyword `pytest --markers` names.
OWN_KEYWORDS: Final[Mapping[str, str]] = {
    "gb": "the budget, GiB or a size such as '512MiB' (required)",
    "tolerance": "allowed drift from the baseline, a fraction or '5%' (default: --vram-tolerance)",
    "leak_tolerance": "allowed growth of the peak from step 2 on (default 0)",
    "capacity_gb": "the device's memory in GiB; a peak above it fails as a predicted OOM",
    "device": "the meter of this test's cases, one of {meters} (default: the run's)",
}
# Every keyword the marker accepts: its own, then the StepSpec fields, which become the
# defaults of vram.step() in that test.
KEYWORDS: Final = (*OWN_KEYWORDS, *FIELDS)
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
    for name, value in kwargs.items():
        if name not in KEYWORDS:
            raise unknown_name(f"keyword {name}={value!r}", name, KEYWORDS)
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
    defaults = {n: check_field(n, v) for n, v in kwargs.items() if n not in OWN_KEYWORDS}
    if "model" in defaults:
        # A complete spec: combinations (an optimizer a method cannot use) fail here too.
        StepSpec.from_kwargs(**defaults)
    return MarkerArgs(budget, tolerance, leak, defaults, capacity, device)


def help_line() -> str:
    """The marker's line for ``pytest --markers``: its keywords as ``parse_marker`` takes them."""
    from pytest_vram.meters import METERS

    own = "; ".join(
        f"{name}: {meaning.format(meters=', '.join(METERS))}"
        for name, meaning in OWN_KEYWORDS.items()
    )
    return (
        f"{MARKER}({', '.join(OWN_KEYWORDS)}, **step): fail when the peak memory of the test's "
        "vram.step()/vram.measure() cases exceeds gb GiB or drifts from the stored baseline. "
        f"{own}. step: StepSpec fields, the defaults of vram.step() in this test: "
        f"{', '.join(FIELDS)}"
    )


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


def check_ranks(value: object) -> int:
    """``vram.measure(..., ranks=N)``: how many ranks run the user's function."""
    check_field("ranks", value)
    assert isinstance(value, int)
    return value


def check_device(value: object) -> str:
    from pytest_vram.meters import METERS

    if not isinstance(value, str) or value not in METERS:
        raise SpecError(f"device={value!r}; choose one of: {', '.join(METERS)}")
    return value
