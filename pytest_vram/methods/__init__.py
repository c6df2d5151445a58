"""Training methods and optimizers, each registered by name.

A new method or optimizer is one small class in a module of this package, listed in that
module's ``REGISTER``. Its ``options`` are declared defaults that also validate
``StepSpec.method_options`` / ``optimizer_options``. The protocols below carry the default
behaviour, so a class overrides only what its library does differently. Importing this package
must stay torch-free: modules import torch, peft and friends inside their functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec

__all__ = [
    "METHODS",
    "OptionValue",
    "OPTIMIZERS",
    "Method",
    "Optimizer",
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


class Method(Protocol):
    name: str
    options: Mapping[str, OptionValue]

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
    name: str
    options: Mapping[str, OptionValue]

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any: ...

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


def _registry() -> tuple[dict[str, Method], dict[str, Optimizer]]:
    methods: dict[str, Method] = {}
    optimizers: dict[str, Optimizer] = {}
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for entry in module.REGISTER:
            table: dict[str, Any] = methods if Method in type(entry).__mro__ else optimizers
            if entry.name in table:
                raise RuntimeError(f"{entry.name!r} is registered twice")
            table[entry.name] = entry
    return methods, optimizers


METHODS, OPTIMIZERS = _registry()


_EXTENSIONS: list[str] = []


def register(entry: Method | Optimizer, *, replace: bool = False) -> None:
    """Add a method or optimizer of your own (an in-house trainer's, or a variant under test).

    Call it at import time of an importable module: the worker child imports that module again
    before it runs a case, so the entry exists there too. ``replace=True`` swaps a built-in.
    """
    table: dict[str, Any] = METHODS if Method in type(entry).__mro__ else OPTIMIZERS
    if entry.name in table and not replace:
        raise ValueError(f"{entry.name!r} is already registered; pass replace=True to swap it")
    table[entry.name] = entry
    module = type(entry).__module__
    if module not in _EXTENSIONS and not module.startswith(f"{__name__}."):
        _EXTENSIONS.append(module)


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
