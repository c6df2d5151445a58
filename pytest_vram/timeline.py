"""Memory over a case's steps: live bytes after each allocation and free, with the phases of
each step, for the HTML report's timeline.

Torch-free: a timeline travels in the result from the worker child as JSON. A meter records
every event; ``decimate`` keeps at most ``MAX_POINTS`` of them, each bucket's lowest and highest,
so the picture keeps its shape and the peak survives exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, final

__all__ = ["MAX_POINTS", "PHASES", "Phase", "Timeline", "decimate"]

MAX_POINTS: Final = 1200
# What a step is made of, in order; "setup" is the model, method and optimizer being built;
# "user" is a user's function (``vram.measure``) between optimizer steps, whose forward and
# backward the meter cannot tell apart.
PHASES: Final = ("setup", "forward", "backward", "optimizer", "user")
# x's unit: "op", the index of the operator dispatched (host and fake meters), or "us",
# microseconds (a GPU snapshot's trace).
UNITS: Final = ("op", "us")


@final
@dataclasses.dataclass(frozen=True)
class Phase:
    start: int  # x where the phase begins; it lasts until the next phase begins
    name: str  # one of PHASES
    step: int  # 1-based training step; 0 for setup


@final
@dataclasses.dataclass(frozen=True)
class Timeline:
    unit: str
    x: tuple[int, ...]
    live_bytes: tuple[int, ...]  # device bytes live after the event at the same index of x
    phases: tuple[Phase, ...] = ()
    events: int = 0  # events recorded before decimation

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"timeline unit {self.unit!r} is not one of {', '.join(UNITS)}")
        if len(self.x) != len(self.live_bytes):
            raise ValueError(
                f"timeline x has {len(self.x)} points and live_bytes {len(self.live_bytes)}"
            )
        for phase in self.phases:
            if phase.name not in PHASES:
                raise ValueError(f"timeline phase {phase.name!r} is not one of {', '.join(PHASES)}")

    @property
    def peak_bytes(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_x(self) -> int | None:
        """Where the live bytes first reach their highest."""
        if not self.live_bytes:
            return None
        return self.x[self.live_bytes.index(self.peak_bytes)]

    def phase_at(self, x: int) -> Phase | None:
        """The phase under way at ``x``."""
        current = None
        for phase in self.phases:
            if phase.start > x:
                break
            current = phase
        return current

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "x": list(self.x),
            "live_bytes": list(self.live_bytes),
            "phases": [[p.start, p.name, p.step] for p in self.phases],
            "events": self.events,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timeline:
        """A timeline from ``to_dict``; a ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"timeline={data!r} is not an object")
        try:
            phases = tuple(Phase(int(s), str(n), int(k)) for s, n, k in data.get("phases", ()))
            return cls(
                unit=str(data["unit"]),
                x=tuple(_ints("x", data["x"])),
                live_bytes=tuple(_ints("live_bytes", data["live_bytes"])),
                phases=phases,
                events=int(data.get("events", 0)),
            )
        except KeyError as exc:
            raise ValueError(f"timeline has no key {exc}") from None
        except TypeError as exc:
            raise ValueError(f"timeline is malformed: {exc}") from None


def _ints(key: str, values: object) -> Iterable[int]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"timeline.{key} is not a list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"timeline.{key} holds {v!r}, not an integer")
        yield v


def decimate(
    x: Sequence[int], live_bytes: Sequence[int], max_points: int = MAX_POINTS
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """At most ``max_points`` of the points, in order: the first and last, and each bucket's
    lowest and highest, so every peak and trough a plot could show is kept."""
    n = len(x)
    if n <= max_points:
        return tuple(x), tuple(live_bytes)
    buckets = max(1, (max_points - 2) // 2)
    keep = {0, n - 1}
    size = (n - 2) / buckets
    for b in range(buckets):
        lo, hi = 1 + int(b * size), 1 + int((b + 1) * size)
        if lo >= hi:
            continue
        window = range(lo, min(hi, n - 1))
        if not window:
            continue
        keep.add(min(window, key=live_bytes.__getitem__))
        keep.add(max(window, key=live_bytes.__getitem__))
    order = sorted(keep)
    return tuple(x[i] for i in order), tuple(live_bytes[i] for i in order)
