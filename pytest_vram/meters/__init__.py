"""Meters: how memory is read. ``base`` and ``limits`` (``unsupported``) are torch-free; the
meters themselves import torch."""

from __future__ import annotations

from typing import Any

from pytest_vram.meters.base import Meter
from pytest_vram.meters.limits import unsupported

__all__ = ["METERS", "make_meter", "unsupported"]

METERS = ("host", "cuda", "fake")


def make_meter(name: str, **options: Any) -> Meter:
    """``options``: ``snapshot_dir`` for every meter; ``peak_source`` for the cuda meter;
    ``trace_dir`` for the fake meter."""
    takes = {"snapshot_dir", "trace_dir"} if name == "fake" else {"snapshot_dir"}
    if name != "cuda" and set(options) - takes:
        raise ValueError(
            f"the {name} meter takes only {' and '.join(sorted(takes))}; "
            f"got {', '.join(sorted(options))}"
        )
    if name == "host":
        from pytest_vram.meters.host import HostMeter

        return HostMeter(**options)
    if name == "cuda":
        from pytest_vram.meters.cuda import CudaMeter

        return CudaMeter(**options)
    if name == "fake":
        from pytest_vram.meters.fake import FakeMeter

        return FakeMeter(**options)
    raise ValueError(f"unknown meter {name!r}; known: {', '.join(METERS)}")
