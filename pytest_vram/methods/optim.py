"""Optimizers from torch; their state is what the breakdown calls optimizer state.

torch picks an implementation by device when none is asked for: ``foreach`` when every
parameter is on CUDA, the for-loop on the CPU (``torch.optim.optimizer.
_default_to_fused_or_foreach``). The implementations hold different temporaries (AdamW's
foreach step makes ``exp_avg_sq.sqrt()`` for the whole group at once: +12.55 GiB on a 7B bf16
step), so every meter builds the one the GPU would run, named in the ``implementation`` option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, final

from pytest_vram.methods import LlamaFactoryRow, Optimizer, OptionValue, ZeroState

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec


# The ``implementation`` option's values, as torch.optim keyword arguments. "foreach" is what
# torch picks on a CUDA device; "fused" is what transformers' Trainer asks for by default
# (``adamw_torch_fused``, with torch >= 2.8).
IMPLEMENTATIONS: Final[Mapping[str, Mapping[str, bool]]] = {
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "fused": {"fused": True},
}
DEFAULT_IMPLEMENTATION: Final = "foreach"


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def torch_kwargs(options: Mapping[str, OptionValue], spec: StepSpec) -> dict[str, Any]:
    """A torch.optim class's keyword arguments for ``spec``: its options, with
    ``implementation`` turned into torch's ``foreach`` / ``fused``."""
    kwargs: dict[str, Any] = {k: spec.optimizer_option(k) for k in options}
    implementation = kwargs.pop("implementation", DEFAULT_IMPLEMENTATION)
    return {**kwargs, **IMPLEMENTATIONS[implementation]}


class _Torch(Optimizer):
    """A torch.optim class whose options are its keyword arguments (``implementation`` being
    torch's ``foreach`` / ``fused``); DeepSpeed wraps it as is."""

    torch_class: ClassVar[str]
    runs_under_zero = True
    fake_meter_blocker = None
    repeats_backward = True

    def build(self, model: torch.nn.Module, spec: StepSpec) -> torch.optim.Optimizer:
        import torch

        cls: type[torch.optim.Optimizer] = getattr(torch.optim, self.torch_class)
        return cls(trainable(model), **torch_kwargs(self.options, spec))

    def incompatible(self, spec: StepSpec) -> str | None:
        implementation = spec.optimizer_option("implementation")
        if implementation not in IMPLEMENTATIONS:
            known = ", ".join(IMPLEMENTATIONS)
            return f"implementation={implementation!r} is not one of {known}"
        return None


@final
class AdamW(_Torch):
    """torch AdamW: two state tensors (exp_avg, exp_avg_sq) the size of each trainable param."""

    name = "adamw"
    options: Mapping[str, OptionValue] = {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "implementation": DEFAULT_IMPLEMENTATION,
    }
    torch_class = "AdamW"
    # The default implementation's (foreach); zero_state_for gives the one a spec asks for.
    zero_state = ZeroState(
        moment_bytes_per_param=8, step_temporaries_per_element=1, whole_group=True
    )
    llama_factory_row = LlamaFactoryRow.FULL
    # Temporaries per stepped element (ZeRO steps one flat fp32 tensor): the for-loop holds
    # exp_avg_sq.sqrt() and the quotient, foreach one sqrt it divides in place, fused none
    # (``torch.optim.adam._single_tensor_adam``, ``_multi_tensor_adam``, ``_fused_adam``).
    _TEMPORARIES: Final = {"for-loop": 2, "foreach": 1, "fused": 0}

    def zero_state_for(self, spec: StepSpec) -> ZeroState:
        implementation = spec.optimizer_option("implementation")
        return dataclasses.replace(
            self.zero_state,
            step_temporaries_per_element=self._TEMPORARIES[implementation],
            whole_group=implementation == "foreach",
        )


@final
class SGD(_Torch):
    """torch SGD; with momentum it keeps one buffer per trainable param, without none."""

    name = "sgd"
    options: Mapping[str, OptionValue] = {
        "lr": 1e-3,
        "momentum": 0.0,
        "implementation": DEFAULT_IMPLEMENTATION,
    }
    torch_class = "SGD"
    # The simulated layout is momentum-free SGD's, which updates in place.
    zero_state = ZeroState(moment_bytes_per_param=0, step_temporaries_per_element=0)
    llama_factory_row = None


REGISTER = [AdamW(), SGD()]
