"""What a meter is: the protocol every meter implements, the optional capabilities a meter may
add, and the tensors it is shown.

``Meter`` declares every member ``run_step`` reads; its body gives the defaults, so a meter
subclasses it and overrides what it does differently. A capability that only some meters have
is its own small protocol, tested once with ``isinstance``. Nothing here imports torch; the
meters themselves do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, runtime_checkable

from pytest_vram.result import StepMeasure
from pytest_vram.timeline import Timeline

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

    from pytest_vram.zero.traces import TraceStore

__all__ = [
    "DeviceIndexed",
    "HostOffloadTagging",
    "Meter",
    "MemorySnapshots",
    "RepeatsLayers",
    "RepeatsSteps",
    "Roles",
]

# Meters that count the same bytes on every machine keep their baselines under one name:
# declared here, torch-free, for the pytest process; each such meter's FINGERPRINT reads it.
FIXED_FINGERPRINTS: Final = {"host": "host-cpu", "fake": "fake"}


@dataclasses.dataclass
class Roles:
    """The tensors that hold model state at the end of a step, for the breakdown."""

    params: Sequence[torch.Tensor]
    buffers: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    optimizer: Sequence[torch.Tensor]


class Meter(Protocol):
    """Reads memory around a step. Host, fake and cuda meters differ only in how they read it."""

    name: str  # MemoryResult.meter
    device: str  # torch device the step runs on
    # What step_end's peak_bytes counts (MemoryResult.peak_source): "storage" is the live
    # tensor storage bytes; the cuda meter counts "allocated", "reserved" or "nvml".
    peak_source: str = "storage"
    # How the libraries behaved during the last case, for MemoryResult.notes.
    notes: Sequence[str] = ()
    # True for a meter under which DeepSpeed cannot run: run_step traces a ZeRO case without
    # it and lays the state out per rank (pytest_vram.zero.simulation) instead of forking ranks.
    simulates_zero: ClassVar[bool] = False
    # Where such a meter keeps the session's traces for its other ZeRO specs of the same step
    # (``zero.traces``); None: each ZeRO case is traced.
    traces: TraceStore | None = None

    def fingerprint(self) -> str:
        """The device's baseline folder name: fixed for a meter whose device is always the same
        (``host-cpu``), read from the device otherwise."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def step_begin(self) -> None: ...

    def step_end(self, roles: Roles) -> StepMeasure: ...

    def note(self, roles: Roles) -> None:
        """Roles of tensors that may be freed before step_end (LOMO's gradients, DeepSpeed's
        gradient partitions): a meter that classifies its peak's storages counts them in that
        role. A meter that reads roles at step_end only ignores them."""
        return None

    def phase(self, name: str, step: int) -> None:
        """The step enters phase ``name`` (``timeline.PHASES``) of training step ``step``."""
        return None

    def timeline(self) -> Timeline | None:
        """Device bytes over the case, read after exit; None from a meter that keeps none."""
        return None

    def versions(self) -> Mapping[str, str]:
        """Versions of what the meter's numbers depend on beyond the Python libraries (driver,
        CUDA), added to MemoryResult.versions."""
        return {}

    def environment(self) -> Mapping[str, str]:
        """Settings outside the case that move the meter's numbers (MemoryResult.environment);
        read while entered."""
        return {}


@runtime_checkable
class HostOffloadTagging(Protocol):
    """A meter that keeps what DeepSpeed offloads out of the device peak and reports it as
    ``StepMeasure.host_offload_bytes``."""

    def offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        """These tensors live in host memory from now on (offloaded state)."""
        ...

    def host_scope(self) -> AbstractContextManager[None]:
        """Everything allocated inside is host memory (the offloaded optimizer step)."""
        ...


@runtime_checkable
class MemorySnapshots(Protocol):
    """A meter that writes a memory snapshot of the case when it exits."""

    snapshot_label: str | None  # names the snapshot file; set before entering
    snapshot_path: str | None  # the snapshot the last exit wrote, if any


@runtime_checkable
class RepeatsSteps(Protocol):
    """A meter that replays a later step's forward and backward from the first step's
    (``meters.repeat``) instead of running them, where the first step proves it can."""

    def backward_end(self, step: int) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``."""
        ...

    def first_step_end(self, params: Sequence[torch.Tensor]) -> None:
        """After the first step's ``step_end``, before its ``zero_grad``."""
        ...

    def replay_step(self, step: int) -> bool:
        """At a later step's start (after ``step_begin``): replay its forward and backward,
        leaving each parameter's gradient in place; False where it cannot (then run it)."""
        ...

    def replayed_step_end(self) -> None:
        """After the replayed step's ``zero_grad``: release what its loss and inputs held."""
        ...


@runtime_checkable
class RepeatsLayers(Protocol):
    """A meter that replays a model's repeated decoder layers from the first of each kind
    (``meters.layers``) instead of running them, where that layer proves it can."""

    def repeat_layers(self, model: torch.nn.Module) -> None:
        """Before the first step: the model whose layers may be replayed until the meter exits."""
        ...


@runtime_checkable
class DeviceIndexed(Protocol):
    """A meter bound to one of several devices by index: each ZeRO rank moves it to its own."""

    device_index: int

    def use_device(self, index: int) -> None:
        """Measure on device ``index`` from now on (``device`` follows)."""
        ...
