"""DeepSpeed's accelerator for a process, and the ops a ZeRO case loads."""

from __future__ import annotations

import os

__all__ = ["build_ops", "set_accelerator"]


def set_accelerator(on_gpu: bool) -> None:
    """DeepSpeed's accelerator for this process and its ranks, whatever the user exported:
    DeepSpeed reads DS_ACCELERATOR once, when it is imported, and a GPU rank given the CPU
    accelerator (or a host rank given CUDA's) would measure the wrong device."""
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"


def build_ops() -> list[str]:
    """JIT-build the DeepSpeed ops a ZeRO case loads (on CPU, the shared-memory collectives
    ``init_distributed`` uses: about 50 s the first time). Builds land in
    TORCH_EXTENSIONS_DIR and are reused; run this once in CI rather than inside a timed case."""
    import torch

    set_accelerator(torch.cuda.is_available())
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["ShareMemCommBuilder"] if accelerator.device_name() == "cpu" else []
    for name in names:
        accelerator.create_op_builder(name).load()
    return names
