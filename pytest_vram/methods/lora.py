from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

from pytest_vram.methods import Method, OptionValue

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from pytest_vram.spec import StepSpec


def lora_config(spec: StepSpec, **extra: Any) -> LoraConfig:
    """The LoraConfig of the spec's LoRA options (shared by DoRA, PiSSA, QLoRA, ...)."""
    from peft import LoraConfig

    targets = spec.method_option("targets")
    return LoraConfig(
        r=spec.method_option("rank"),
        lora_alpha=spec.method_option("alpha"),
        lora_dropout=spec.method_option("dropout"),
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        task_type="CAUSAL_LM",
        **extra,
    )


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
        from peft import get_peft_model

        return get_peft_model(model, lora_config(spec))


REGISTER = [Lora()]
