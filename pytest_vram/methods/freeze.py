from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, final

from pytest_vram.errors import SpecError
from pytest_vram.methods import LlamaFactoryRow, Method, OptionValue, Trains

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


@final
class Freeze(Method):
    """Only the last ``trainable_layers`` decoder layers train (LLaMA-Factory's ``freeze``)."""

    name = "freeze"
    options: Mapping[str, OptionValue] = {"trainable_layers": 2}
    trains = Trains.SOME_WEIGHTS
    runs_under_zero = True
    fake_meter_blocker = None
    llama_factory_row = LlamaFactoryRow.FREEZE_LORA
    base_weight_bits = None

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        k = spec.method_option("trainable_layers")
        layers = model.get_decoder().layers  # type: ignore[operator]
        if not 1 <= k <= len(layers):
            raise SpecError(
                f"method_options: trainable_layers={k} must be between 1 and the "
                f"{len(layers)} layers of {spec.model}"
            )
        model.requires_grad_(False)
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        return model


REGISTER = [Freeze()]
