"""DeepSpeed ZeRO inside one rank: the engine as a trainer.

A rank runs the same ``run_step`` loop as a plain case, with the DeepSpeed engine in place of
the optimizer, under its own meter; ``ranks`` starts the ranks and combines their results.
What the engine holds, by role, and what it offloads, as host memory, is ``accounting``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from pytest_vram import methods
from pytest_vram.meters.base import Meter, Roles
from pytest_vram.spec import StepSpec
from pytest_vram.zero import user_config
from pytest_vram.zero.accounting import EngineAccounting, pinned_as_host
from pytest_vram.zero.config import ds_config

__all__ = ["ZeroTrainer", "cast_as_engine", "engine_config"]

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def engine_config(spec: StepSpec, model: torch.nn.Module) -> dict[str, Any]:
    """The DeepSpeed config ``spec`` runs with on ``model``: the user's (``deepspeed=``), its
    "auto" values filled in as Trainer fills them, or pytest-vram's own (``zero=``). The fake
    meter's simulation lays the step out by the same config."""
    if spec.deepspeed:
        config = user_config.resolve(spec, model)
        # DeepSpeed refuses a torch optimizer under optimizer offload unless told; accelerate
        # swaps in DeepSpeedCPUAdam there, which keeps the same fp32 moments on the host.
        if spec.offload in ("optimizer", "both"):
            config.setdefault("zero_force_ds_cpu_optimizer", False)
        return config
    return ds_config(spec, max(p.numel() for p in model.parameters()))


def cast_as_engine(model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Cast the parameters as ``deepspeed.initialize`` does under fp16 or bf16
    (``DeepSpeedEngine._cast_module_mixed_precision``): every floating parameter to the
    training dtype, peft's fp32 adapters included; buffers and bitsandbytes' packed weights
    stay. The fake meter's simulation traces the step so, since its activations follow the
    adapters' dtype (an fp32 adapter keeps an fp32 copy of its input)."""
    if config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif config.get("fp16", {}).get("enabled"):
        dtype = torch.float16
    else:
        return
    for p in model.parameters():
        if p.dtype in _CASTABLE and p.dtype != dtype:
            p.data = p.data.to(dtype)


class ZeroTrainer:
    """The DeepSpeed engine around a model and its client optimizer, built inside the meter."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: StepSpec, meter: Meter
    ) -> None:
        import deepspeed

        self.config = engine_config(spec, model)
        self.meter = meter
        method = methods.METHODS[spec.method]
        with pinned_as_host(meter):
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.engine: Any = engine
        self.accounting = EngineAccounting(engine, meter, method.state_tensors)

    @property
    def forward(self) -> torch.nn.Module:
        engine: torch.nn.Module = self.engine
        return engine

    def roles(self) -> Roles:
        return self.accounting.roles()

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.accounting.note()  # gradient partitions: freed inside engine.step()
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def notes(self) -> tuple[str, ...]:
        return ()  # the config is in the result (zero_config)
