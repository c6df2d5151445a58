"""The fake meter: the host meter's ledger over torch's FakeTensorMode.

Tensors have shapes, dtypes and storages of the right size but no data, so a real 7B or 32B
config is traced in seconds with every parameter, gradient, optimizer state and activation
counted as the host meter would count it on a machine large enough to run it.

Two places where torch and transformers behave differently on fake tensors are bridged for the
time the meter is entered, so that the same library code runs as on real ones:

* ``Module.to()`` (peft moves every adapter layer with it) swaps each fake parameter through
  ``torch.utils.swap_tensors`` whatever ``set_swap_module_params_on_conversion`` says, and that
  refuses a tensor with a weak reference, which FakeTensorMode's converter memo holds on nearly
  every fake tensor (pytorch/pytorch#148977). As the fix proposed upstream (#178584), the memo
  entries of the two tensors being swapped are dropped.
* transformers reads position ids to see whether sequences are packed, and on fake data (no
  values) builds the causal mask the real run skips. Position ids that the meter saw made by
  ``arange`` (transformers' own, when none are passed) are consecutive: those get the real
  run's answer, "not packed".

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
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)
from torch.utils.weak import WeakIdKeyDictionary

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
from pytest_vram.meters.host import HostMeter, StorageLedger
from pytest_vram.meters.layers import LayerReplay
from pytest_vram.meters.repeat import StepReplay
from pytest_vram.result import StepMeasure
from pytest_vram.timeline import Timeline

if TYPE_CHECKING:
    from pytest_vram.spec import StepSpec

__all__ = ["FakeMeter"]

_VALUES = "fake tensors hold no values"

# Data-free ops that make a run of consecutive numbers, and ops that keep it one.
_ARANGE: Final = frozenset(
    {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}
)
_SHIFT: Final = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor})
_COPY: Final = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.clone.default})


class _Ramps:
    """Storages known to hold consecutive numbers n, n+1, ...: made by ``arange`` with step 1,
    shifted by a scalar or copied. transformers makes its default position ids this way. It
    observes the ops the ledger sees (the step's own), after each has run."""

    def __init__(self) -> None:
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __call__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if func in _ARANGE:
            ramp = (args[2] if len(args) > 2 else kwargs.get("step", 1)) == 1
        elif func in _SHIFT:
            ramp = any(self._read_in_order(a) and _is_scalar(b) for a, b in (args, args[::-1]))
        else:
            ramp = func in _COPY and self._read_in_order(args[0])
        if ramp:
            self._storages[out.untyped_storage()] = True

    def holds_ramp(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage() in self._storages

    def _read_in_order(self, t: object) -> bool:
        """A contiguous view of a ramp: an op's contiguous output from it is a ramp too."""
        return isinstance(t, torch.Tensor) and self.holds_ramp(t) and t.is_contiguous()

    def consecutive(self, t: torch.Tensor) -> bool:
        """Each row of ``t`` counts up by one: a ramp read with unit stride on the last dim."""
        return self.holds_ramp(t) and t.dim() > 0 and (t.stride(-1) == 1 or t.size(-1) == 1)


class _Inert:
    """Operators that allocate nothing and return nothing: torch's in-place foreach ops
    (``_foreach_mul_``, ``_foreach_addcdiv_``), an optimizer's whole update. On fake tensors
    they change no size, and FakeTensorMode runs them one tensor at a time to check shapes the
    optimizer made equal: most of a traced optimizer step. Their version-counter bump is made
    before any dispatch mode sees the op. They still run on tensors whose value fake mode
    follows (an optimizer's step count, read back as a number)."""

    def __init__(self) -> None:
        self._inert: dict[Any, bool] = {}

    def __call__(self, func: Any, args: tuple[Any, ...]) -> bool:
        inert = self._inert.get(func)
        if inert is None:
            schema = func._schema
            name = schema.name
            inert = self._inert[func] = (
                name.startswith("aten::_foreach_") and name.endswith("_") and not schema.returns
            )
        return inert and not any(
            isinstance(t, FakeTensor) and t.constant is not None for t in args[0]
        )


def _is_scalar(x: object) -> bool:
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _forget(t: torch.Tensor) -> None:
    """Drop ``t`` from its fake mode's converter memo, whose weak reference blocks a swap."""
    if not isinstance(t, FakeTensor):
        return
    memo = t.fake_mode.fake_tensor_converter.tensor_memo
    for ref in weakref.getweakrefs(t):
        if isinstance(ref, weakref.KeyedRef) and memo.get(ref.key) is t:
            del memo[ref.key]


@final
class FakeMeter(Meter, MemorySnapshots, RepeatsSteps, RepeatsLayers):
    """The host meter's counts for a step whose tensors hold no data."""

    name = "fake"
    device = "cpu"  # fake tensors say cpu; none of them holds memory
    FINGERPRINT: Final = FIXED_FINGERPRINTS["fake"]  # sizes only: the same on every machine
    # The DeepSpeed engine does not run under FakeTensorMode.
    simulates_zero = True

    def __init__(self, snapshot_dir: str | None = None, *, replay_layers: bool = True) -> None:
        """``replay_layers``: replay repeated decoder layers (``meters.layers``); off, every
        layer is traced (the tests compare the two)."""
        self._host = HostMeter(snapshot_dir)
        self._replay_layers = replay_layers
        self._layers: LayerReplay | None = None
        # Libraries keep module-level real tensors (bitsandbytes' quantization map): fake mode
        # converts them when they are used, and the ledger counts them as the host meter does.
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._ramps = _Ramps()
        self._inert = _Inert()
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
        self._patch(torch.utils, "swap_tensors", _swap_tensors)
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


_swap_original = torch.utils.swap_tensors


def _swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
    _forget(t1)
    _forget(t2)
    _swap_original(t1, t2)  # type: ignore[no-untyped-call]


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
