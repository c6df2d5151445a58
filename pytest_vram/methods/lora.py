from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

from pytest_vram.methods import LlamaFactoryRow, Method, OptionValue, Trains

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from pytest_vram.spec import StepSpec


def target_modules(spec: StepSpec) -> str | list[str]:
    """The ``targets`` option as peft takes it: one word (``all-linear``) or a list of names."""
    targets: str | tuple[str, ...] = spec.method_option("targets")
    return list(targets) if isinstance(targets, tuple) else targets


def lora_config(spec: StepSpec, **extra: Any) -> LoraConfig:
    """The LoraConfig of the spec's LoRA options (shared by DoRA, PiSSA, QLoRA, ...)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.method_option("rank"),
        lora_alpha=spec.method_option("alpha"),
        lora_dropout=spec.method_option("dropout"),
        target_modules=target_modules(spec),
        task_type="CAUSAL_LM",
        **extra,
    )


class LoraFamily(Method):
    """LoRA adapters on an unquantized base: LoRA's options and what the variants share."""

    options: Mapping[str, OptionValue] = {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "targets": "all-linear",
    }
    trains = Trains.LORA
    runs_under_zero = False
    fake_meter_blocker = None
    llama_factory_row = LlamaFactoryRow.FREEZE_LORA
    base_weight_bits = None


@final
class Lora(LoraFamily):
    """peft LoRA adapters; the base model is frozen (peft keeps adapters in fp32 by default)."""

    name = "lora"
    runs_under_zero = True

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(spec))


REGISTER = [Lora()]
