"""Meters: how memory is read. ``base`` is torch-free; the meters themselves import torch."""

from __future__ import annotations

from pytest_vram.meters.base import Meter

__all__ = ["METERS", "make_meter"]

METERS = ("host", "cuda")


def make_meter(name: str) -> Meter:
    if name == "host":
        from pytest_vram.meters.host import HostMeter

        return HostMeter()
    if name == "cuda":
        from pytest_vram.meters.cuda import CudaMeter

        return CudaMeter()
    raise ValueError(f"unknown meter {name!r}; known: {', '.join(METERS)}")
