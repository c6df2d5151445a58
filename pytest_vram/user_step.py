"""The user's own function under a meter (``vram.measure``), and the steps it marks.

``measure_fn`` runs the function as one measured window; each ``mark_step`` call inside it
ends a step there, as ``run_step`` ends its own steps, so the breakdown of that step's peak is
read while its gradients and optimizer state are held. The open windows are module state: the
function runs in this process, and ``mark_step`` is reached from the user's code (or from
``integrations.VramCallback``) without a handle. ``measure_ranks`` runs it on N ranks with
torchrun's environment. A DeepSpeed engine the function builds (itself, or through accelerate
for a Trainer) is accounted as the built-in ZeRO step's is: its roles, and what it offloads as
host memory (``zero.accounting``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pytest_vram.meters.base import MemorySnapshots, Meter, Roles
from pytest_vram.result import MemoryResult, StepMeasure
from pytest_vram.step import optimizer_phases, result_of, roles_of

if TYPE_CHECKING:
    from pytest_vram.zero.accounting import EngineAccounting

__all__ = ["mark_step", "measure_call", "measure_fn", "measure_ranks"]


@dataclasses.dataclass
class _Windows:
    meter: Meter
    steps: list[StepMeasure] = dataclasses.field(default_factory=list)
    # DeepSpeed engines the function built: their roles replace the model's and optimizer's.
    engines: list[EngineAccounting] = dataclasses.field(default_factory=list)

    def roles(self, model: torch.nn.Module | None, optimizer: Any) -> Roles:
        if not self.engines:
            return roles_of(model, optimizer)
        each = [e.roles() for e in self.engines]
        return Roles(
            params=[t for r in each for t in r.params],
            buffers=[t for r in each for t in r.buffers],
            grads=[t for r in each for t in r.grads],
            optimizer=[t for r in each for t in r.optimizer],
        )


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
        windows.steps.append(windows.meter.step_end(windows.roles(model, optimizer)))
        windows.meter.step_begin()


@contextlib.contextmanager
def _engines(meter: Meter) -> Iterator[list[EngineAccounting]]:
    """Account the DeepSpeed engines built inside, when DeepSpeed is already imported (its
    import is not the step's: importing it inside the window would count its tensors)."""
    if "deepspeed" not in sys.modules:
        yield []
        return
    from pytest_vram.zero.accounting import user_engines

    with user_engines(meter) as made:
        yield made


def measure_fn(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    meter: Meter,
    label: str | None = None,
) -> MemoryResult:
    """Run a user's function under the meter.

    Without ``mark_step`` calls the whole function is one step, whose breakdown comes from
    what ``fn`` returns (``model`` or ``(model, optimizer)``), read when it returns: tensors
    freed before then (gradients after ``zero_grad``) count as activations and temporaries.
    """
    windows = _Windows(meter)
    name = label if label is not None else f"{fn.__module__}.{fn.__qualname__}"
    snapshots = meter if isinstance(meter, MemorySnapshots) else None
    if snapshots is not None:
        snapshots.snapshot_label = name
    with meter, _engines(meter) as engines, optimizer_phases(meter, then="user") as phases:
        phases.step = 1
        meter.phase("user", 1)
        windows.engines = engines
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
        tail = meter.step_end(windows.roles(model, optimizer))
        # After the last mark_step the tail only matters if it holds the peak.
        if not windows.steps or tail.peak_bytes > max(s.peak_bytes for s in windows.steps):
            windows.steps.append(tail)
        if model is None and engines:
            model = engines[0].engine.module
        result = result_of(name, None, meter, windows.steps, model)
    # Read after exit: the cuda meter's timeline comes from the snapshot it writes then.
    snapshot = snapshots.snapshot_path if snapshots is not None else None
    result = dataclasses.replace(result, timeline=meter.timeline(), snapshot_path=snapshot)
    # The config DeepSpeed ran with, as for a built-in ZeRO case (the first engine's).
    return dataclasses.replace(result, zero_config=engines[0].config) if engines else result


def measure_call(call: bytes, label: str, meter: Meter) -> MemoryResult:
    """``measure_fn`` of a pickled ``(fn, args, kwargs)``: the user's module is imported here."""
    fn, args, kwargs = pickle.loads(call)  # noqa: S301 - our own job, from the pytest process
    return measure_fn(fn, args, kwargs, meter, label)


def _in_rank(call: bytes, label: str, meter: Meter) -> MemoryResult:
    # DeepSpeed before the window: its import-time tensors are not the step's, and the engines
    # the user's code builds are then accounted (``_engines``).
    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401
    return measure_call(call, label, meter)


def measure_ranks(
    call: bytes, label: str, meter: Meter, world: int, imports: Sequence[str]
) -> MemoryResult:
    """The user's function on ``world`` ranks with torchrun's environment, each measured; the
    user's code starts the process group, as it does under torchrun."""
    from pytest_vram import ranks

    body = functools.partial(_in_rank, call, label)
    return ranks.run_ranks(world, label, meter, body, imports, start_group=False)
