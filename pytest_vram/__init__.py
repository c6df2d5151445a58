"""pytest-vram: GPU memory budgets and baselines for LLM fine-tuning steps.

PYTEST_DONT_REWRITE: ``pytest-vram refresh`` imports this package before pytest loads it as a
plugin, and it holds no test asserts to rewrite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_vram.errors import SpecError
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec

__all__ = [
    "Breakdown",
    "MemoryResult",
    "SpecError",
    "StepSpec",
    "__version__",
    "mark_step",
    "measure",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from pytest_vram.meters.base import Meter


def measure(spec: StepSpec, meter: Meter | str = "host") -> MemoryResult:
    """Run one spec in this process (no isolation); the pytest plugin isolates it for you."""
    from pytest_vram.meters import make_meter
    from pytest_vram.step import run_step

    return run_step(spec, make_meter(meter) if isinstance(meter, str) else meter)


def mark_step(model: Any = None, optimizer: Any = None) -> None:
    """In a function run by ``vram.measure``: end a training step here (after
    ``optimizer.step()``, before ``zero_grad()``) so its breakdown sees the gradients."""
    import sys

    step = sys.modules.get("pytest_vram.user_step")
    if step is not None:  # not imported: no measurement is running in this process
        step.mark_step(model, optimizer)
