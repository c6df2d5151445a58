"""DeepSpeed ZeRO inside one rank: the engine as a trainer.

A rank runs the same ``run_step`` loop as a plain case, with the DeepSpeed engine in place of
the optimizer, under its own meter; ``zero.ranks`` starts the ranks and combines their results.

On the host meter, what DeepSpeed offloads (the optimizer's fp32 master partitions and state,
ZeRO-3's parameter partitions, pinned buffers) is tagged as host memory when it is created and
reported as ``host_offload_bytes``, outside the device peak: so "offload must not raise device
memory" is checked on CPU as it would be on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Final

import torch

from pytest_vram import methods
from pytest_vram.meters.base import HostOffloadTagging, Meter, Roles
from pytest_vram.spec import StepSpec
from pytest_vram.zero import user_config
from pytest_vram.zero.config import ds_config

__all__ = ["ZeroTrainer"]

# DeepSpeed attributes holding, per stage, the flat model weights and the gradient partitions (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, 0.16-0.19).
_PARAM_ATTRS: Final = (
    "bit16_groups_flat",
    "fp16_partitioned_groups_flat",
    "lp_param_buffer",
    "bf16_groups_flat",
)
_GRAD_ATTRS: Final = (
    "averaged_gradients",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "fp32_groups_gradients_flat",
    "fp32_groups_gradient_flat_partition",
)
# Not listed: the reduction buckets (ipg_buckets, temp_grad_buffer_for_*_offload) are
# communication scratch, sized by the config; they count as temporaries.
# The fp32 master partitions the client optimizer steps (offloaded with the optimizer).
_MASTER_ATTRS: Final = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in methods.state_tensors(obj) if t.untyped_storage().nbytes()]


class ZeroTrainer:
    """The DeepSpeed engine around a model and its client optimizer, built inside the meter."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: StepSpec, meter: Meter
    ) -> None:
        import deepspeed

        largest = max(p.numel() for p in model.parameters())
        if spec.deepspeed:
            self.config = user_config.resolve(spec, model)
            # DeepSpeed refuses a torch optimizer under optimizer offload unless told; accelerate
            # swaps in DeepSpeedCPUAdam there, which keeps the same fp32 moments on the host.
            if spec.offload in ("optimizer", "both"):
                self.config.setdefault("zero_force_ds_cpu_optimizer", False)
        else:
            self.config = ds_config(spec, largest)
        self.meter = meter
        # A meter without tagging counts offloaded state wherever its storage is.
        self.tagging = meter if isinstance(meter, HostOffloadTagging) else None
        self.method = methods.METHODS[spec.method]
        self.inner = optimizer
        self.offload_optimizer = spec.offload in ("optimizer", "both")
        self.offload_param = spec.offload in ("param", "both")
        with self._pinned_is_offloaded(spec.offload != "none"):
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.engine: Any = engine
        # The master gradients exist only while the inner step runs: note roles around it.
        optimizer.register_step_pre_hook(lambda *_: self._enter_inner_step())
        optimizer.register_step_post_hook(lambda *_: self._leave_inner_step())
        if self.offload_optimizer:
            self._offloaded(self._inner_tensors())
        if self.offload_param:
            self._offloaded(self._partitions())
        self._host: contextlib.ExitStack | None = None

    @property
    def forward(self) -> torch.nn.Module:
        engine: torch.nn.Module = self.engine
        return engine

    def _offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        if self.tagging is not None:
            self.tagging.offloaded(list(tensors))

    def _enter_inner_step(self) -> None:
        self._note()
        if self.offload_optimizer and self.tagging is not None:
            # The step runs on the host: its state and temporaries are host memory.
            self._host = contextlib.ExitStack()
            self._host.enter_context(self.tagging.host_scope())

    def _leave_inner_step(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.offload_optimizer:
            self._offloaded(self._inner_tensors())
        self._note()

    @contextlib.contextmanager
    def _pinned_is_offloaded(self, active: bool) -> Iterator[None]:
        """DeepSpeed pins the host buffers it offloads to; note them as they are made."""
        if not active:
            yield
            return
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        pin = accelerator.pin_memory

        def pinned(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out: torch.Tensor = pin(tensor, *args, **kwargs)
            self._offloaded([out])
            return out

        accelerator.pin_memory = pinned
        try:
            yield
        finally:
            del accelerator.pin_memory

    def _partitions(self) -> list[torch.Tensor]:
        params = self.engine.module.parameters()
        return [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]

    def _inner_tensors(self) -> list[torch.Tensor]:
        """The client optimizer's master partitions, their gradients and its state."""
        model_ptrs = {t.untyped_storage().data_ptr() for t in self._model_tensors()}
        masters = self._masters()
        out = [p for p in masters if p.untyped_storage().data_ptr() not in model_ptrs]
        out += [p.grad for p in masters if p.grad is not None]
        return out + _tensors(self.inner.state)

    def _masters(self) -> list[torch.Tensor]:
        zopt = self.engine.optimizer
        masters = [t for name in _MASTER_ATTRS for t in _tensors(getattr(zopt, name, None))]
        return masters + [p for g in self.inner.param_groups for p in g["params"]]

    def _model_tensors(self) -> list[torch.Tensor]:
        params = list(self.engine.module.parameters())
        zopt = self.engine.optimizer
        flat = [t for name in _PARAM_ATTRS for t in _tensors(getattr(zopt, name, None))]
        return params + self._partitions() + flat

    def roles(self) -> Roles:
        module = self.engine.module
        params = self._model_tensors()
        model_ptrs = {t.untyped_storage().data_ptr() for t in params}
        zopt = self.engine.optimizer
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        grads += [t for name in _GRAD_ATTRS for t in _tensors(getattr(zopt, name, None))]
        masters = self._masters()
        grads += [p.grad for p in masters if p.grad is not None]
        state = [p for p in masters if p.untyped_storage().data_ptr() not in model_ptrs]
        return Roles(
            params=params,
            buffers=[*module.buffers(), *self.method.state_tensors(module)],
            grads=grads,
            optimizer=state + _tensors(self.inner.state),
        )

    def _note(self) -> None:
        self.meter.note(self.roles())

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._note()  # gradient partitions: freed inside engine.step()
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def notes(self) -> tuple[str, ...]:
        return ()  # the config is in the result (zero_config)
