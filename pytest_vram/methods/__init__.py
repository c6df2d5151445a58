"""Training methods and optimizers, each registered by name.

A new method is one small module that defines a class with ``name``, ``options`` (declared
defaults, which also validate ``StepSpec.method_options``) and ``prepare``; importing this package
must stay torch-free, so the modules import torch and peft inside their functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from pytest_vram.spec import OptionValue

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec

__all__ = ["METHODS", "OPTIMIZERS", "Method", "Optimizer"]


class Method(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def options(self) -> Mapping[str, OptionValue]:
        """Declared option defaults; they also validate ``StepSpec.method_options``."""
        ...

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        """Set what trains (and wrap the model if the method does); return the model to step."""
        ...


class Optimizer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def options(self) -> Mapping[str, OptionValue]: ...

    def build(self, model: torch.nn.Module, spec: StepSpec) -> torch.optim.Optimizer: ...


def _registry() -> tuple[dict[str, Method], dict[str, Optimizer]]:
    from pytest_vram.methods import freeze, full, lora, optim

    methods: list[Method] = [full.Full(), freeze.Freeze(), lora.Lora()]
    optimizers: list[Optimizer] = [optim.AdamW(), optim.SGD()]
    return {m.name: m for m in methods}, {o.name: o for o in optimizers}


METHODS, OPTIMIZERS = _registry()
