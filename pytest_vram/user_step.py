"""The user's own function under a meter (``vram.measure``), and the steps it marks.

``measure_fn`` runs the function as one measured window; each ``mark_step`` call inside it
ends a step there, as ``run_step`` ends its own steps, so the breakdown of that step's peak is
read while its gradients and optimizer state are held. The open windows are module state: the
function runs in this process, and ``mark_step`` is reached from the user's code (or from
``integrations.VramCallback``) without a handle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from pytest_vram.meters.base import Meter
from pytest_vram.result import MemoryResult, StepMeasure
from pytest_vram.step import result_of, roles_of

__all__ = ["mark_step", "measure_fn"]


@dataclasses.dataclass
class _Windows:
    meter: Meter
    steps: list[StepMeasure] = dataclasses.field(default_factory=list)


_OPEN: list[_Windows] = []


def mark_step(
    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """End a step inside a function run by ``vram.measure``, as run_step does for its steps.

    Call it after ``optimizer.step()`` and before ``zero_grad()``: the breakdown of that step's
    peak is then read while its gradients and optimizer state are still held. Outside
    ``vram.measure`` it does nothing, so training code can keep the call.
    """
    if _OPEN:
        windows = _OPEN[-1]
        windows.steps.append(windows.meter.step_end(roles_of(model, optimizer)))
        windows.meter.step_begin()


def measure_fn(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], meter: Meter
) -> MemoryResult:
    """Run a user's function under the meter.

    Without ``mark_step`` calls the whole function is one step, whose breakdown comes from
    what ``fn`` returns (``model`` or ``(model, optimizer)``), read when it returns: tensors
    freed before then (gradients after ``zero_grad``) count as activations and temporaries.
    """
    windows = _Windows(meter)
    with meter:
        _OPEN.append(windows)
        try:
            meter.step_begin()
            out = fn(*args, **kwargs)
        finally:
            _OPEN.pop()
        model, optimizer = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not isinstance(model, torch.nn.Module):
            model = None
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = None
        tail = meter.step_end(roles_of(model, optimizer))
        # After the last mark_step the tail only matters if it holds the peak.
        if not windows.steps or tail.peak_bytes > max(s.peak_bytes for s in windows.steps):
            windows.steps.append(tail)
        label = f"{fn.__module__}.{fn.__qualname__}"
        return result_of(label, None, meter, windows.steps, model)
