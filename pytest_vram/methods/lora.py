from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, final

from pytest_vram.methods import Method
from pytest_vram.spec import OptionValue

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


@final
class Lora(Method):
    """peft LoRA adapters; the base model is frozen (peft keeps adapters in fp32 by default)."""

    name = "lora"
    options: Mapping[str, OptionValue] = {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "targets": "all-linear",
    }

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = spec.method_option("targets")
        config = LoraConfig(
            r=spec.method_option("rank"),
            lora_alpha=spec.method_option("alpha"),
            lora_dropout=spec.method_option("dropout"),
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)


REGISTER = [Lora()]
