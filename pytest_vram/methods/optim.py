"""Optimizers from torch; their state is what the breakdown calls optimizer state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, final

from pytest_vram.methods import LlamaFactoryRow, Optimizer, OptionValue, ZeroState

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class _Torch(Optimizer):
    """A torch.optim class whose options are its keyword arguments; DeepSpeed wraps it as is."""

    torch_class: ClassVar[str]
    runs_under_zero = True
    fake_meter_blocker = None

    def build(self, model: torch.nn.Module, spec: StepSpec) -> torch.optim.Optimizer:
        import torch

        cls: type[torch.optim.Optimizer] = getattr(torch.optim, self.torch_class)
        return cls(trainable(model), **{k: spec.optimizer_option(k) for k in self.options})


@final
class AdamW(_Torch):
    """torch AdamW: two state tensors (exp_avg, exp_avg_sq) the size of each trainable param."""

    name = "adamw"
    options: Mapping[str, OptionValue] = {"lr": 1e-4, "weight_decay": 0.0}
    torch_class = "AdamW"
    # Its single-tensor step holds exp_avg_sq.sqrt() and the quotient: two temporaries.
    zero_state = ZeroState(moment_bytes_per_param=8, step_temporaries_per_element=2)
    llama_factory_row = LlamaFactoryRow.FULL


@final
class SGD(_Torch):
    """torch SGD; with momentum it keeps one buffer per trainable param, without none."""

    name = "sgd"
    options: Mapping[str, OptionValue] = {"lr": 1e-3, "momentum": 0.0}
    torch_class = "SGD"
    # The simulated layout is momentum-free SGD's, which updates in place.
    zero_state = ZeroState(moment_bytes_per_param=0, step_temporaries_per_element=0)
    llama_factory_row = None


REGISTER = [AdamW(), SGD()]
