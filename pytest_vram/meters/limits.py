"""What a meter cannot measure, decided without torch: the pytest process asks at collection.

The model kind, the method and the optimizer each declare why the fake meter cannot trace
them (``fake_meter_blocker``); the methods' and optimizers' own ``unsupported`` still run in
the child, where the libraries are importable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_vram import methods, zoo

if TYPE_CHECKING:
    from pytest_vram.spec import StepSpec

__all__ = ["unsupported"]


def unsupported(meter: str, spec: StepSpec) -> str | None:
    """Why ``meter`` cannot measure ``spec`` (None if it can)."""
    if meter != "fake":
        return None
    for what, reason in (
        (spec.model, zoo.MODELS[spec.model].fake_meter_blocker),
        (spec.method, methods.METHODS[spec.method].fake_meter_blocker),
        (spec.optimizer, methods.OPTIMIZERS[spec.optimizer].fake_meter_blocker),
    ):
        if reason:
            return f"{what} is not supported on the fake meter: {reason}"
    return None
