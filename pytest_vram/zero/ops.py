"""DeepSpeed's accelerator for a process, and the ops a ZeRO case loads."""

from __future__ import annotations

import os

__all__ = ["build_ops", "builds_for_gpu", "set_accelerator"]


def set_accelerator(on_gpu: bool) -> None:
    """DeepSpeed's accelerator for this process and its ranks, whatever the user exported:
    DeepSpeed reads DS_ACCELERATOR once, when it is imported, and a GPU rank given the CPU
    accelerator (or a host rank given CUDA's) would measure the wrong device."""
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"


def builds_for_gpu(exported: str | None, gpu_visible: bool) -> bool:
    """Whether ``build_ops`` builds for the GPU: when one is visible, unless DS_ACCELERATOR=cpu
    was exported. A GPU machine runs the host meter's ZeRO cases too (``pytest suites`` without
    --gpu), whose gloo ranks load the CPU op; the cases themselves never read the exported
    value (``set_accelerator``), so asking for the CPU op here changes no GPU case."""
    return gpu_visible and exported != "cpu"


def build_ops() -> list[str]:
    """JIT-build the DeepSpeed ops a ZeRO case loads (on CPU, the shared-memory collectives
    ``init_distributed`` uses, about 50 s the first time, and DeepSpeedCPUAdam, which
    accelerate swaps in for a Trainer's optimizer under optimizer offload; on a GPU nothing,
    nccl needs no build). Builds land in TORCH_EXTENSIONS_DIR and are reused; run this once in
    CI rather than inside a timed case."""
    import torch

    set_accelerator(builds_for_gpu(os.environ.get("DS_ACCELERATOR"), torch.cuda.is_available()))
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["ShareMemCommBuilder", "CPUAdamBuilder"] if accelerator.device_name() == "cpu" else []
    for name in names:
        accelerator.create_op_builder(name).load()
    return names
