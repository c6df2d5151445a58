"""Training methods and optimizers, each registered by name.

A new method or optimizer is one small class in a module of this package, listed in that
module's ``REGISTER``. Its ``options`` are declared defaults that also validate
``StepSpec.method_options`` / ``optimizer_options``. Everything the rest of the package needs to
know about it (what ZeRO runs, what the fake meter cannot trace, which row of LLaMA-Factory's
table it belongs to, ...) is a class attribute declared on the protocols below, so no module
outside this package names methods or optimizers. The protocols carry the default behaviour and
facts, so a class overrides only what its library does differently. Importing this package must
stay torch-free: modules import torch, peft and friends inside their functions.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, final

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec

__all__ = [
    "METHODS",
    "OptionValue",
    "OPTIMIZERS",
    "LlamaFactoryRow",
    "Method",
    "Optimizer",
    "Trains",
    "ZeroState",
    "extension_modules",
    "register",
    "restore",
    "snapshot",
    "state_tensors",
]

# Modules whose REGISTER lists are collected, in this order.
_MODULES: Final = ("full", "freeze", "lora", "peft_methods", "quant", "optim", "optim_extra")

# The type of a declared option default, and so of every value StepSpec accepts for it.
OptionValue = int | float | str | bool | tuple[str, ...]


class Trains(enum.Enum):
    """What a method trains, for optimizers that pick their own parameters (GaLore, BAdam)."""

    ALL_WEIGHTS = "every weight of the model"
    SOME_WEIGHTS = "some of the model's own weights"
    LORA = "LoRA adapters, whose parameter names contain 'lora'"
    OTHER = "other adapters or virtual tokens"


class LlamaFactoryRow(enum.Enum):
    """The rows of LLaMA-Factory's estimate table (``references.LLAMA_FACTORY``) by the start
    of their Method cell; a row's bits then pick one of its lines."""

    FULL = "Full"
    FREEZE_LORA = "Freeze/LoRA/GaLore/APOLLO/BAdam"
    QLORA = "QLoRA"


@final
@dataclasses.dataclass(frozen=True)
class ZeroState:
    """An optimizer's footprint under ZeRO, for the simulated per-rank layout of the fake meter
    (``zero.simulation``), which adds DeepSpeed's fp32 master copy itself."""

    moment_bytes_per_param: int  # state per trainable parameter (AdamW: two fp32 moments)
    step_temporaries_per_element: int  # fp32 tensors its step holds the size of what it steps
    # True: the step holds them for every tensor of a group at once (foreach), not for one
    # tensor at a time (the for-loop); the same on ZeRO's one flat partition, not on ZeRO-0's
    # per-parameter masters.
    whole_group: bool = False


def state_tensors(obj: Any, _depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors held in optimizer state: directly, in containers, or on helper objects (GaLore's
    projector keeps its matrix as an attribute)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif _depth > 3:
        return
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from state_tensors(value, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from state_tensors(value, _depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            yield from state_tensors(value, _depth + 1)


# The facts below have defaults that are right for a method or optimizer nobody described (a
# user's own): ZeRO, GaLore and BAdam refuse it rather than guess, the fake meter tries it, and
# LLaMA-Factory's table has no row for it. Every built-in declares each fact itself
# (tests/test_method_declarations.py), so a forgotten one fails a test.


class Method(Protocol):
    kind: ClassVar[Literal["method"]] = "method"  # what the registry files it as
    name: str
    options: Mapping[str, OptionValue]
    trains: ClassVar[Trains] = Trains.OTHER
    # DeepSpeed wraps the torch optimizer over what this method trains, unchanged.
    runs_under_zero: ClassVar[bool] = False
    # Why the fake meter (tensors without values) cannot trace it, naming the library call.
    fake_meter_blocker: ClassVar[str | None] = None
    # FULL: the optimizer names the row (full training with GaLore is the Freeze/LoRA row).
    llama_factory_row: ClassVar[LlamaFactoryRow | None] = None
    # Bits per base weight once quantized (QLoRA: 4); None: the base keeps the run's precision.
    base_weight_bits: ClassVar[int | None] = None

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        """Set what trains (and wrap the model if the method does); return the model to step."""
        ...

    def build_model(self, spec: StepSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
        """The base model; quantized methods load theirs differently."""
        from pytest_vram import zoo

        return zoo.build_model(spec.model, dtype, device, spec.attention)

    def state_tensors(self, model: torch.nn.Module) -> Iterable[torch.Tensor]:
        """Model state that is neither a parameter nor a buffer (quantization constants)."""
        return ()

    def build_optimizer(self, model: torch.nn.Module, spec: StepSpec, optimizer: Optimizer) -> Any:
        """The optimizer over what trains; LoRA+ builds its own param groups through peft."""
        return optimizer.build(model, spec)

    def incompatible(self, spec: StepSpec) -> str | None:
        """Why this method cannot run with the rest of ``spec`` (checked when the spec is made)."""
        return None

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        """Why it cannot run on this device (checked in the child; the case is skipped)."""
        return None


class Optimizer(Protocol):
    kind: ClassVar[Literal["optimizer"]] = "optimizer"
    name: str
    options: Mapping[str, OptionValue]
    runs_under_zero: ClassVar[bool] = False
    # None: no simulated ZeRO layout, so the fake meter cannot measure its ZeRO cases.
    zero_state: ClassVar[ZeroState | None] = None
    # Its backward_step is the default (``loss.backward()``, then ``optimizer.step()``) and its
    # backward the same every step (nothing updates inside it, what trains never changes): the
    # fake meter replays the first step's forward and backward for later ones.
    repeats_backward: ClassVar[bool] = False
    fake_meter_blocker: ClassVar[str | None] = None
    # The row of full training with it (the table's Full rows are AdamW's).
    llama_factory_row: ClassVar[
        Literal[LlamaFactoryRow.FULL, LlamaFactoryRow.FREEZE_LORA] | None
    ] = None
    # The torch.optim class it is, built over the trainable parameters with its options as
    # keyword arguments (LoRA+ hands it to peft); None: a library's own optimizer.
    torch_class: ClassVar[str | None] = None

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any: ...

    def zero_state_for(self, spec: StepSpec) -> ZeroState | None:
        """The footprint under ZeRO of the optimizer ``spec`` builds (options may change it)."""
        return self.zero_state

    def backward_step(self, optimizer: Any, loss: torch.Tensor, spec: StepSpec) -> None:
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def zero_grad(self, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=True)

    def state_tensors(self, optimizer: Any) -> Iterable[torch.Tensor]:
        return state_tensors(getattr(optimizer, "state", {}))

    def notes(self, optimizer: Any) -> tuple[str, ...]:
        """What the result should say about how the library behaved (e.g. paging fell back)."""
        return ()

    def incompatible(self, spec: StepSpec) -> str | None:
        return None

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        return None


METHODS: Final[dict[str, Method]] = {}
OPTIMIZERS: Final[dict[str, Optimizer]] = {}
_EXTENSIONS: list[str] = []


def _table(entry: Method | Optimizer) -> dict[str, Any]:
    """The registry an entry is filed in, by the kind it declares."""
    if entry.kind == "method":
        return METHODS
    if entry.kind == "optimizer":
        return OPTIMIZERS
    raise TypeError(
        f"{type(entry).__name__} declares kind={entry.kind!r}; an entry is a 'method' or an "
        "'optimizer' (subclass Method or Optimizer)"
    )


def register(entry: Method | Optimizer, *, replace: bool = False) -> None:
    """Add a method or optimizer of your own (an in-house trainer's, or a variant under test).

    Call it at import time of an importable module: the worker child imports that module again
    before it runs a case, so the entry exists there too. ``replace=True`` swaps a built-in.
    """
    table = _table(entry)
    if entry.name in table and not replace:
        raise ValueError(f"{entry.name!r} is already registered; pass replace=True to swap it")
    table[entry.name] = entry
    module = type(entry).__module__
    if module not in _EXTENSIONS and not module.startswith(f"{__name__}."):
        _EXTENSIONS.append(module)


def _register_builtins() -> None:
    for name in _MODULES:
        for entry in importlib.import_module(f"{__name__}.{name}").REGISTER:
            register(entry)


_register_builtins()


Snapshot = tuple[dict[str, Method], dict[str, Optimizer], list[str]]


def snapshot() -> Snapshot:
    return dict(METHODS), dict(OPTIMIZERS), list(_EXTENSIONS)


def restore(saved: Snapshot) -> None:
    """Undo registrations made since ``saved`` (a pytest session's conftests, for one)."""
    for table, old in ((METHODS, saved[0]), (OPTIMIZERS, saved[1])):
        table.clear()
        table.update(old)  # type: ignore[arg-type]
    _EXTENSIONS[:] = saved[2]


def extension_modules() -> tuple[str, ...]:
    """Modules that registered entries; the worker child imports them before a case."""
    return tuple(_EXTENSIONS)
