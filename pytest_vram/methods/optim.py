"""Optimizers from torch; their state is what the breakdown calls optimizer state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, final

from pytest_vram.methods import Optimizer, OptionValue

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@final
class AdamW(Optimizer):
    """torch AdamW: two state tensors (exp_avg, exp_avg_sq) the size of each trainable param."""

    name = "adamw"
    options: Mapping[str, OptionValue] = {"lr": 1e-4, "weight_decay": 0.0}

    def build(self, model: torch.nn.Module, spec: StepSpec) -> torch.optim.Optimizer:
        import torch

        return torch.optim.AdamW(
            trainable(model),
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
        )


@final
class SGD(Optimizer):
    """torch SGD; with momentum it keeps one buffer per trainable param, without none."""

    name = "sgd"
    options: Mapping[str, OptionValue] = {"lr": 1e-3, "momentum": 0.0}

    def build(self, model: torch.nn.Module, spec: StepSpec) -> torch.optim.Optimizer:
        import torch

        return torch.optim.SGD(
            trainable(model),
            lr=spec.optimizer_option("lr"),
            momentum=spec.optimizer_option("momentum"),
        )


REGISTER = [AdamW(), SGD()]
