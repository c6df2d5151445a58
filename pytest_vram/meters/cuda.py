"""The GPU meter: torch's own allocator counters around each step.

Peak allocated is what the budget checks; reserved is recorded beside it. The breakdown's model
state (params, grads, optimizer) is read from the role tensors at the end of the step, and the
rest of the peak is activations and temporaries. Later issues add NVML sampling, snapshots and
ranks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import final

import torch

from pytest_vram.meters.base import Breakdown, Roles, StepMeasure

__all__ = ["CudaMeter", "fingerprint_from_name", "storage_bytes"]


def fingerprint_from_name(name: str, total_bytes: int) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; the size is added when the name lacks it."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = re.sub(r"^nvidia-", "", words) or "gpu"
    if not re.search(r"\d+gb", words):
        words += f"-{round(total_bytes / 2**30)}gb"
    return f"nvidia-{words}"


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen``."""
    total = 0
    for t in tensors:
        if getattr(t, "is_paged", False):  # bitsandbytes managed memory: not in the allocator
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@final
class CudaMeter:
    name = "cuda"
    device = "cuda"

    def fingerprint(self) -> str:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return fingerprint_from_name(props.name, props.total_memory)

    def __enter__(self) -> CudaMeter:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the cuda meter needs a visible GPU; torch.cuda.is_available() is False"
            )
        torch.cuda.empty_cache()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()

    def step_begin(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step_end(self, roles: Roles) -> StepMeasure:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        seen: set[int] = set()
        grad = storage_bytes(roles.grads, seen)
        opt = storage_bytes(roles.optimizer, seen)
        param = storage_bytes(roles.params, seen)
        buffer = storage_bytes(roles.buffers, seen)
        breakdown = Breakdown(
            param_bytes=param,
            buffer_bytes=buffer,
            grad_bytes=grad,
            optimizer_bytes=opt,
            activation_bytes=max(0, peak - param - buffer - grad - opt),
        )
        return StepMeasure(peak, breakdown, reserved_bytes=torch.cuda.max_memory_reserved())
