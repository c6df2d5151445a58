"""DeepSpeed's accelerator for a process, and the ops a ZeRO case loads."""

from __future__ import annotations

import os
import sys

__all__ = [
    "build_ops",
    "builds_for_gpu",
    "ninja_first",
    "set_accelerator",
    "use_ninja_beside_python",
]


def set_accelerator(on_gpu: bool) -> None:
    """DeepSpeed's accelerator for this process and its ranks, whatever the user exported:
    DeepSpeed reads DS_ACCELERATOR once, when it is imported, and a GPU rank given the CPU
    accelerator (or a host rank given CUDA's) would measure the wrong device."""
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"


def ninja_first(python: str, path: str) -> str:
    """``path`` (a PATH value) with ``python``'s directory first when a ``ninja`` lies there.

    torch runs the ``ninja`` PATH finds for its JIT builds, and ninja's versions record a build's
    command line differently: the pip one (DeepSpeed requires it) beside the venv's python and a
    system one seen without the venv activated each find the other's build changed and rebuild
    DeepSpeed's ops, 30-50 s inside whichever case loads them first."""
    directory = os.path.dirname(python)
    if not os.access(os.path.join(directory, "ninja"), os.X_OK):
        return path
    rest = [entry for entry in path.split(os.pathsep) if entry and entry != directory]
    return os.pathsep.join([directory, *rest])


def use_ninja_beside_python() -> None:
    """This process and its children build with the ninja of this Python's environment
    (``ninja_first``): ``pytest-vram build-ops`` and every case, activated or not."""
    os.environ["PATH"] = ninja_first(sys.executable, os.environ.get("PATH", ""))


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

    use_ninja_beside_python()
    set_accelerator(builds_for_gpu(os.environ.get("DS_ACCELERATOR"), torch.cuda.is_available()))
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["ShareMemCommBuilder", "CPUAdamBuilder"] if accelerator.device_name() == "cpu" else []
    for name in names:
        accelerator.create_op_builder(name).load()
    return names
