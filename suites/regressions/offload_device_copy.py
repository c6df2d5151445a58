"""DeepSpeed ZeRO-Offload that keeps a device copy of what it offloads.

Imitates DeepSpeed#467 "Zero-Offload Doubles VRAM Usage" (enabling ``cpu_offload`` took a
ZeRO-2 run from 4 GB to 8 GB of GPU memory) and DeepSpeed#1437 "[BUG] Offload memory usage not
performing as expected" (ZeRO-3 offload that did not lower device memory); the LLaMA-Factory
users' 8-GPU run (188.8 GB with offload against 75.4 GB without, Juejin article, 2025) is the
same class.

The mechanism: after each offloaded optimizer step on the host, the fp32 master partitions,
their gradients and the optimizer's moments are mirrored back to the accelerator and kept there
(as a "prefetch for the next step" would), so the host copy no longer replaces the device one. Both ZeRO-1/2's
``DeepSpeedZeroOptimizer`` and ZeRO-3's ``DeepSpeedZeroOptimizer_Stage3`` are patched.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _mirror(zero: Any, group: int, masters: list[torch.Tensor]) -> None:
    """Copies of the offloaded masters, their gradients and their state, on the device."""
    device = torch.device(get_accelerator().current_device_name())
    kept: dict[tuple[int, int], torch.Tensor] = getattr(zero, "_offload_device_mirror", {})
    tensors = [*masters, *(m.grad for m in masters if m.grad is not None)]
    for master in masters:
        tensors.extend(
            v for v in zero.optimizer.state.get(master, {}).values() if torch.is_tensor(v)
        )
    for i, tensor in enumerate(t for t in tensors if t.numel() > 1):
        kept[group, i] = tensor.detach().to(device, copy=True)  # a copy even where host is device
    zero._offload_device_mirror = kept


def _patch(cls: Any, offloaded: str, masters: str) -> None:
    step = cls._optimizer_step

    def optimizer_step(self: Any, group: int) -> None:
        step(self, group)
        if getattr(self, offloaded):
            _mirror(self, group, [getattr(self, masters)[group]])

    cls._optimizer_step = optimizer_step


_patch(DeepSpeedZeroOptimizer, "cpu_offload", "single_partition_of_fp32_groups")
_patch(DeepSpeedZeroOptimizer_Stage3, "offload_optimizer", "fp32_partitioned_groups_flat")
