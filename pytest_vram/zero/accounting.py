"""What a DeepSpeed engine holds, by role, and what it offloads, tagged as host memory.

The built-in ZeRO step (``engine.ZeroTrainer``) and every engine the user's own code creates
under ``vram.measure`` (``user_engines``) are accounted the same way: on a meter that tags host
memory, what DeepSpeed offloads (the optimizer's fp32 master partitions and state, ZeRO-3's
parameter partitions, the pinned buffers it stages them in) is reported as
``host_offload_bytes``, outside the device peak, and the offloaded optimizer step runs in the
meter's host scope. So "offload must not raise device memory" is checked on CPU as on a GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import torch

from pytest_vram import methods
from pytest_vram.meters.base import HostOffloadTagging, Meter, Roles

__all__ = ["EngineAccounting", "pinned_as_host", "user_engines"]

# DeepSpeed attributes holding, per stage, the flat model weights and the gradient partitions
# (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, 0.16-0.19).
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
_HOST_DEVICES: Final = ("cpu", "nvme")

ExtraBuffers = Callable[[torch.nn.Module], Iterable[torch.Tensor]]


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in methods.state_tensors(obj) if t.untyped_storage().nbytes()]


def _offloaded_to_host(offload: Any) -> bool:
    """``engine.zero_offload_optimizer()`` / ``zero_offload_param()``: a config or None."""
    device = getattr(offload, "device", None)
    return str(getattr(device, "value", device)) in _HOST_DEVICES


def _json_safe(value: Any) -> Any:
    """Strict JSON for a baseline file: transformers sets ``steps_per_print`` to infinity."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _client_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer the engine steps: inside the ZeRO (or bf16) wrapper, or the engine's
    optimizer itself without one."""
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return outer if isinstance(outer, torch.optim.Optimizer) else None


class EngineAccounting:
    """Roles and host tagging for one DeepSpeed engine, from the moment it is built."""

    def __init__(self, engine: Any, meter: Meter, extra_buffers: ExtraBuffers | None = None):
        self.engine = engine
        self.meter = meter
        self.extra_buffers = extra_buffers
        # A meter without tagging counts offloaded state wherever its storage is.
        self.tagging = meter if isinstance(meter, HostOffloadTagging) else None
        stage = int(engine.zero_optimization_stage())
        self.offload_optimizer = stage > 0 and _offloaded_to_host(engine.zero_offload_optimizer())
        self.offload_param = stage == 3 and _offloaded_to_host(engine.zero_offload_param())
        self.inner = _client_optimizer(engine)
        self._host: contextlib.ExitStack | None = None
        if self.inner is not None:
            # The master gradients exist only while the inner step runs: note roles around it.
            self.inner.register_step_pre_hook(lambda *_: self._enter_inner_step())
            self.inner.register_step_post_hook(lambda *_: self._leave_inner_step())
        if self.offload_optimizer:
            self._offloaded(self._inner_tensors())
        if self.offload_param:
            self._offloaded(self._partitions())

    @property
    def config(self) -> dict[str, Any]:
        """The config the engine runs with, as DeepSpeed parsed it (a Trainer's with its "auto"
        values filled in), JSON-safe for the result."""
        parsed = getattr(self.engine._config, "_param_dict", None) or {}
        safe: dict[str, Any] = _json_safe(parsed)
        return safe

    def _offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        if self.tagging is not None:
            self.tagging.offloaded(list(tensors))

    def _enter_inner_step(self) -> None:
        self.note()
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
        self.note()

    def _partitions(self) -> list[torch.Tensor]:
        params = self.engine.module.parameters()
        return [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]

    def _inner_state(self) -> list[torch.Tensor]:
        return _tensors(self.inner.state) if self.inner is not None else []

    def _inner_tensors(self) -> list[torch.Tensor]:
        """The client optimizer's master partitions, their gradients and its state."""
        model_ptrs = {t.untyped_storage().data_ptr() for t in self._model_tensors()}
        masters = self._masters()
        out = [p for p in masters if p.untyped_storage().data_ptr() not in model_ptrs]
        out += [p.grad for p in masters if p.grad is not None]
        return out + self._inner_state()

    def _masters(self) -> list[torch.Tensor]:
        zopt = self.engine.optimizer
        masters = [t for name in _MASTER_ATTRS for t in _tensors(getattr(zopt, name, None))]
        groups = self.inner.param_groups if self.inner is not None else []
        return masters + [p for g in groups for p in g["params"]]

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
        extra = list(self.extra_buffers(module)) if self.extra_buffers is not None else []
        return Roles(
            params=params,
            buffers=[*module.buffers(), *extra],
            grads=grads,
            optimizer=state + self._inner_state(),
        )

    def note(self) -> None:
        self.meter.note(self.roles())


@contextlib.contextmanager
def pinned_as_host(meter: Meter) -> Iterator[None]:
    """Every buffer DeepSpeed pins while this is open is tagged as host memory: DeepSpeed pins
    only the host side of what it offloads (its ``pin_memory`` calls are all on offload paths)."""
    if not isinstance(meter, HostOffloadTagging):
        yield
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    pin = accelerator.pin_memory

    def pinned(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = pin(tensor, *args, **kwargs)
        meter.offloaded([out])
        return out

    accelerator.pin_memory = pinned
    try:
        yield
    finally:
        del accelerator.pin_memory


@contextlib.contextmanager
def user_engines(meter: Meter) -> Iterator[list[EngineAccounting]]:
    """Account every DeepSpeed engine built while this is open, wherever the user's code (or
    accelerate, for a Trainer) calls ``deepspeed.initialize``: the list fills as they are made.

    The hook is on ``DeepSpeedEngine.__init__``, not on ``deepspeed.initialize``: accelerate
    keeps its own reference to ``initialize``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    made: list[EngineAccounting] = []
    original = DeepSpeedEngine.__init__

    def init(engine: Any, *args: Any, **kwargs: Any) -> None:
        original(engine, *args, **kwargs)
        made.append(EngineAccounting(engine, meter))

    DeepSpeedEngine.__init__ = init
    try:
        with pinned_as_host(meter):
            yield made
    finally:
        DeepSpeedEngine.__init__ = original
