"""The fake meter: the host meter's ledger over torch's FakeTensorMode.

Tensors have shapes, dtypes and storages of the right size but no data, so a real 7B or 32B
config is traced in seconds with every parameter, gradient, optimizer state and activation
counted as the host meter would count it on a machine large enough to run it.

Where torch and transformers behave differently on fake tensors, ``meters.fake_bridges``
bridges them for the time the meter is entered, so that the same library code runs as on real
ones; it also names the ops that need not run at all on fake tensors.

A module first imported inside the meter keeps the fake tensors it makes at import (peft's LoHa
default arguments): the plugin runs each case in a fresh child of a preloaded server.

What is known not to run on fake tensors is checked up front, torch-free, by
``FakeMeter.unsupported(spec)`` (``meters.limits.unsupported`` at collection); an op that
reads tensor values at run time makes ``run_step`` raise ``Unsupported``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)

from pytest_vram.allocator import AllocatorConfig, Replay
from pytest_vram.errors import Unsupported
from pytest_vram.meters import limits
from pytest_vram.meters.base import (
    FIXED_FINGERPRINTS,
    MemorySnapshots,
    Meter,
    RepeatsLayers,
    RepeatsSteps,
    Roles,
)
from pytest_vram.meters.fake_bridges import InertOps, Ramps, module_to, swap_tensors
from pytest_vram.meters.host import HostMeter, StorageLedger
from pytest_vram.meters.layers import LayerReplay
from pytest_vram.meters.repeat import StepReplay
from pytest_vram.result import StepMeasure
from pytest_vram.timeline import Timeline
from pytest_vram.zero.traces import TraceStore

if TYPE_CHECKING:
    from pytest_vram.spec import StepSpec

__all__ = ["FakeMeter"]

_VALUES = "fake tensors hold no values"


@final
class FakeMeter(Meter, MemorySnapshots, RepeatsSteps, RepeatsLayers):
    """The host meter's counts for a step whose tensors hold no data."""

    name = "fake"
    device = "cpu"  # fake tensors say cpu; none of them holds memory
    FINGERPRINT: Final = FIXED_FINGERPRINTS["fake"]  # sizes only: the same on every machine
    # The DeepSpeed engine does not run under FakeTensorMode.
    simulates_zero = True

    def __init__(
        self,
        snapshot_dir: str | None = None,
        *,
        replay_layers: bool = True,
        trace_dir: str | None = None,
    ) -> None:
        """``replay_layers``: replay repeated decoder layers (``meters.layers``); off, every
        layer is traced (the tests compare the two). ``trace_dir``: the session's folder of
        simulated ZeRO traces (``zero.traces``)."""
        self._host = HostMeter(snapshot_dir, fp32_matmul=False)  # fake tensors: no arithmetic
        self.traces = TraceStore(trace_dir, snapshot_dir) if trace_dir is not None else None
        self._replay_layers = replay_layers
        self._layers: LayerReplay | None = None
        # Libraries keep module-level real tensors (bitsandbytes' quantization map): fake mode
        # converts them when they are used, and the ledger counts them as the host meter does.
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._ramps = Ramps()
        self._inert = InertOps()
        self._restore: list[Callable[[], None]] = []
        self._replay: Replay | None = None
        self._steps = StepReplay(self._host)
        self._host.import_scope = self._real_import

    @contextlib.contextmanager
    def _real_import(self) -> Iterator[None]:
        """A module first imported inside makes real tensors, unseen by the ledger."""
        with unset_fake_temporarily(), self._host.paused():
            yield

    @property
    def ledger(self) -> StorageLedger:
        return self._host.ledger

    # The host meter under it writes the snapshot, of the fake tensors' storages.
    @property
    def snapshot_label(self) -> str | None:
        return self._host.snapshot_label

    @snapshot_label.setter
    def snapshot_label(self, label: str | None) -> None:
        self._host.snapshot_label = label

    @property
    def snapshot_path(self) -> str | None:
        return self._host.snapshot_path

    @snapshot_path.setter
    def snapshot_path(self, path: str | None) -> None:
        self._host.snapshot_path = path

    def fingerprint(self) -> str:
        return self.FINGERPRINT

    @staticmethod
    def unsupported(spec: StepSpec) -> str | None:
        """Why ``spec`` cannot be traced on fake tensors (None if it can); torch-free as
        ``pytest_vram.meters.limits.unsupported("fake", spec)``, for collection."""
        return limits.unsupported(FakeMeter.name, spec)

    def __enter__(self) -> FakeMeter:
        self._patch(torch.utils, "swap_tensors", swap_tensors)
        self._patch(torch.nn.Module, "to", module_to)
        from transformers import masking_utils

        find = masking_utils.find_packed_sequence_indices
        ramps = self._ramps

        def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
            packed: torch.Tensor | None = find(position_ids)  # the real run's ops, for the ledger
            # The real run reads the values and finds consecutive positions unpacked.
            return None if packed is not None and ramps.consecutive(position_ids) else packed

        self._patch(masking_utils, "find_packed_sequence_indices", find_packed_sequence_indices)
        # The fake mode sits below the ledger: the ledger sees each op, then fake runs it.
        self._fake.__enter__()
        self._host.observe(self._ramps, self._inert)
        self._host.__enter__()
        return self

    def _patch(self, owner: object, name: str, new: object) -> None:
        old = getattr(owner, name)
        setattr(owner, name, new)
        self._restore.append(lambda: setattr(owner, name, old))

    def repeat_layers(self, model: torch.nn.Module) -> None:
        if self._replay_layers:
            self._layers = LayerReplay(self._host)
            self._layers.install(model)

    @property
    def replayed_layers(self) -> int:
        """Decoder layer calls replayed from a traced one, not traced."""
        return 0 if self._layers is None else self._layers.replayed

    def __exit__(self, *exc: object) -> None:
        if self._layers is not None:
            self._layers.restore()
        self._host.__exit__(*exc)
        self._host.observe(None)
        self._fake.__exit__(None, None, None)
        while self._restore:
            self._restore.pop()()
        error = exc[1] if len(exc) > 1 else None
        if isinstance(error, Exception):
            reason = _not_traceable(error)
            if reason:
                raise Unsupported(reason) from error

    def step_begin(self) -> None:
        self._host.step_begin()
        # What the CUDA caching allocator would report for each step: everything before the
        # step replayed, then the peaks reset, as the cuda meter resets them. Like the cuda
        # meter, the first step starts with the blocks the model's build cached released
        # (empty_cache); later steps keep what the steps before them cached.
        # PYTORCH_CUDA_ALLOC_CONF is read as torch reads it; a value torch would refuse fails
        # the case with torch's reason.
        first = self._replay is None
        if self._replay is None:
            self._replay = Replay(AllocatorConfig.from_env(os.environ))
        self._replay.feed(self.ledger.events)
        if first:
            self._replay.allocator.empty_cache()
        self._replay.allocator.reset_peaks()

    def note(self, roles: Roles) -> None:
        self._host.note(roles)

    def phase(self, name: str, step: int) -> None:
        self._steps.phase(name, step)
        self._host.phase(name, step)

    def backward_end(self, step: int) -> None:
        self._steps.backward_end(step)

    def first_step_end(self, params: Sequence[torch.Tensor]) -> None:
        self._steps.first_step_end(params)

    def replay_step(self, step: int) -> bool:
        return self._steps.replay(step)

    def replayed_step_end(self) -> None:
        self._steps.release()

    @property
    def replayed_steps(self) -> int:
        """Steps whose forward and backward were replayed from the first, not traced."""
        return self._steps.replayed

    def timeline(self) -> Timeline:
        return self._host.timeline()

    def step_end(self, roles: Roles) -> StepMeasure:
        measure = self._host.step_end(roles)
        assert self._replay is not None  # step_begin made it
        self._replay.feed(self.ledger.events)
        allocator = self._replay.allocator
        return dataclasses.replace(
            measure,
            allocated_bytes=allocator.max_allocated_bytes,
            reserved_bytes=allocator.max_reserved_bytes,
        )

    def environment(self) -> dict[str, str]:
        """The allocator settings the reserved prediction followed, when any are set."""
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        return {"PYTORCH_CUDA_ALLOC_CONF": conf} if conf else {}


def _not_traceable(error: Exception) -> str | None:
    """An error that says the step needs tensor values, as ``Unsupported``'s message."""
    func = getattr(error, "func", None)
    if isinstance(error, DataDependentOutputException):
        reason = f"it reads a tensor's value ({func}); {_VALUES}"
    elif isinstance(error, DynamicOutputShapeException):
        reason = f"the shape of {func}'s output depends on tensor values; {_VALUES}"
    elif isinstance(error, UnsupportedOperatorException):
        reason = f"{func} has no fake (shape-only) implementation"
    else:
        return None
    return f"{_caller(error.__traceback__)} is not supported on the fake meter: {reason}"


def _caller(tb: TracebackType | None) -> str:
    """The innermost function outside torch and the meters on the traceback: the library
    call that needed values."""
    where = "this step"
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        if not module.startswith(("torch.", "pytest_vram.meters.")):
            code: Any = frame.f_code
            where = f"{module}.{getattr(code, 'co_qualname', code.co_name)}"
        tb = tb.tb_next
    return where
