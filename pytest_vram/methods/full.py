from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, final

from pytest_vram.methods import LlamaFactoryRow, Method, OptionValue, Trains

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


@final
class Full(Method):
    """Every parameter trains."""

    name = "full"
    options: Mapping[str, OptionValue] = {}
    trains = Trains.ALL_WEIGHTS
    runs_under_zero = True
    fake_meter_blocker = None
    llama_factory_row = LlamaFactoryRow.FULL
    base_weight_bits = None

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        model.requires_grad_(True)
        return model


REGISTER = [Full()]
