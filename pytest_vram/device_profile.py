"""What a GPU process holds besides the tensors of its step, so that the fake meter's trace
predicts ``max_memory_allocated``, ``max_memory_reserved`` and what nvidia-smi (NVML) shows.

Three terms, each from the library that allocates it:

* **cuBLAS workspaces**, through the caching allocator (so in allocated and reserved). torch
  gives each (cuBLAS handle, stream) one workspace of ``getChosenWorkspaceSize()``
  (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``parseChosenWorkspaceSize``):
  ``CUBLAS_WORKSPACE_CONFIG``'s ``:SIZE_KiB:COUNT`` pairs summed, else 32 MiB on compute
  capability 9.x, 10.x and 12.x (Hopper, Blackwell) and ``:4096:2:16:8`` (8,320 KiB) on the
  others. cuBLASLt shares it unless ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=0``, when it allocates
  ``CUBLASLT_WORKSPACE_SIZE`` KiB (default 1024) of its own. Handles are per thread, and a
  training step runs matmuls on two: the forward's and autograd's device thread in backward.
* **The CUDA context**, outside the allocator (NVML only): the driver's state and the kernels
  loaded into it. With lazy module loading (CUDA 11.7 on, torch's default) a bare context was
  426 MiB on an RTX 6000 Ada (PyTorch 2.10, CUDA 13.0; measured in unsloth-zoo pull request
  1053); PyTorch's maintainers put it at "around 400MB" (pytorch issue 109888). Kernels a step
  loads on first use add to it, which only a GPU run measures: ``calibration`` reports the
  measured NVML - reserved of every GPU case, to set ``context_mib`` from.
* **NCCL's buffers**, outside the allocator, for more than one rank: 544 MiB per GPU for a
  2-GPU communicator and 688 MiB for 3 or 4, measured on 4 A100s with NVLink (NCCL issue 964).
  They grow with NCCL's channels (faster links use more), so ``nccl_mib`` overrides them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final, final

from pytest_vram.allocator import CachingAllocator
from pytest_vram.errors import SpecError

__all__ = [
    "CONTEXT_BYTES",
    "GPUS",
    "DeviceProfile",
    "DeviceProfileError",
    "cublas_workspace_bytes",
]

MIB: Final = 2**20
KIB: Final = 2**10
CONTEXT_BYTES: Final = 426 * MIB
CONTEXT_SOURCE: Final = (
    "a bare CUDA context, 426 MiB on an RTX 6000 Ada with PyTorch 2.10 and CUDA 13.0 "
    "(unsloth-zoo pull request 1053); kernels loaded during the step add to it"
)
# Per GPU, by communicator size: 2 ranks, 3 or more (NCCL issue 964: 4 x A100, NVLink).
NCCL_BYTES: Final = {2: 544 * MIB, 3: 688 * MIB}
NCCL_SOURCE: Final = "NCCL's buffers as measured on 4 x A100 with NVLink (NCCL issue 964)"
# Threads that run matmuls in a training step, each with its own cuBLAS handle: the
# forward's, and autograd's device thread in the backward.
MATMUL_THREADS: Final = 2

# Names ``estimate --gpu-model`` takes, with the compute capability that sets the workspace.
GPUS: Final[Mapping[str, tuple[str, tuple[int, int]]]] = {
    "v100": ("NVIDIA V100", (7, 0)),
    "t4": ("NVIDIA T4", (7, 5)),
    "a100": ("NVIDIA A100", (8, 0)),
    "a10": ("NVIDIA A10", (8, 6)),
    "rtx-3090": ("NVIDIA GeForce RTX 3090", (8, 6)),
    "rtx-4090": ("NVIDIA GeForce RTX 4090", (8, 9)),
    "l40s": ("NVIDIA L40S", (8, 9)),
    "rtx-6000-ada": ("NVIDIA RTX 6000 Ada", (8, 9)),
    "h100": ("NVIDIA H100", (9, 0)),
    "h200": ("NVIDIA H200", (9, 0)),
    "b200": ("NVIDIA B200", (10, 0)),
    "rtx-5090": ("NVIDIA GeForce RTX 5090", (12, 0)),
}


class DeviceProfileError(SpecError):
    """A device name or setting the profile cannot use; the message names the value."""


def cublas_workspace_bytes(capability: tuple[int, int] | None, environ: Mapping[str, str]) -> int:
    """One cuBLAS workspace, as torch's ``parseChosenWorkspaceSize`` sizes it; a capability
    of None (no GPU named) is taken as pre-Hopper."""
    config = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * KIB * int(count) for size, count in pairs)
        # torch warns and falls back to its default
    if capability is not None and capability[0] in (9, 10, 12):
        return 4096 * KIB * 8
    return 4096 * KIB * 2 + 16 * KIB * 8


def _cublaslt_workspace_bytes(environ: Mapping[str, str]) -> int:
    """cuBLASLt's own workspace, 0 where it shares cuBLAS's (torch's default)."""
    unified = environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1").strip().lower()
    if unified not in ("0", "false", "off", "no"):
        return 0
    size = environ.get("CUBLASLT_WORKSPACE_SIZE", "1024")
    try:
        return int(size) * KIB
    except ValueError:
        return 1024 * KIB  # torch warns and keeps its default


@final
@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What one GPU process holds besides the step's tensors. ``name`` is the GPU as torch
    names it (or "unnamed GPU"); every byte count is per process, that is per rank."""

    name: str
    capability: tuple[int, int] | None
    workspace_bytes: int  # one cuBLAS (+ cuBLASLt) workspace, per matmul thread
    context_bytes: int = CONTEXT_BYTES
    nccl_bytes: Mapping[int, int] = dataclasses.field(default_factory=lambda: dict(NCCL_BYTES))

    @classmethod
    def of(
        cls,
        name: str,
        capability: tuple[int, int] | None,
        environ: Mapping[str, str],
        *,
        context_mib: float | None = None,
        nccl_mib: float | None = None,
    ) -> DeviceProfile:
        """The profile of a GPU under ``environ`` (the variables torch reads); ``context_mib``
        and ``nccl_mib`` replace the published figures with one's own."""
        workspace = cublas_workspace_bytes(capability, environ) + _cublaslt_workspace_bytes(environ)
        context = CONTEXT_BYTES if context_mib is None else _mib("context_mib", context_mib)
        nccl = dict(NCCL_BYTES)
        if nccl_mib is not None:
            nccl = dict.fromkeys(NCCL_BYTES, _mib("nccl_mib", nccl_mib))
        return cls(name, capability, workspace, context, nccl)

    @classmethod
    def named(
        cls, gpu: str | None, environ: Mapping[str, str], **overrides: float | None
    ) -> DeviceProfile:
        """``estimate --gpu-model``: a name of ``GPUS``, or None for an unnamed pre-Hopper GPU."""
        if gpu is None:
            return cls.of("unnamed GPU", None, environ, **overrides)
        key = gpu.strip().lower()
        if key not in GPUS:
            raise DeviceProfileError(f"--gpu-model {gpu!r} is not known; known: {', '.join(GPUS)}")
        name, capability = GPUS[key]
        return cls.of(name, capability, environ, **overrides)

    @classmethod
    def from_measured(
        cls, device: str, environment: Mapping[str, str], **overrides: float | None
    ) -> DeviceProfile:
        """The profile of the GPU a cuda-meter result ran on: its fingerprint and the
        environment it recorded (``capability``, ``env:NAME`` variables)."""
        capability = None
        match = re.fullmatch(r"(\d+)\.(\d+)", environment.get("capability", ""))
        if match:
            capability = (int(match[1]), int(match[2]))
        environ = {
            k.removeprefix("env:"): v for k, v in environment.items() if k.startswith("env:")
        }
        return cls.of(device, capability, environ, **overrides)

    def workspaces_bytes(self) -> int:
        """The step's cuBLAS workspaces, held from their first matmul to the process's end."""
        return MATMUL_THREADS * self.workspace_bytes

    def workspaces_reserved_bytes(self) -> int:
        """The segments the workspaces take when no cached block holds them (an upper bound:
        on the GPU they may land in segments the step's tensors freed)."""
        allocator = CachingAllocator()
        for key in range(MATMUL_THREADS):
            allocator.malloc(key, self.workspace_bytes)
        return allocator.reserved_bytes

    def nccl_bytes_for(self, ranks: int) -> int:
        if ranks < 2:
            return 0
        return self.nccl_bytes[min(ranks, max(self.nccl_bytes))]

    def outside_allocator_bytes(self, ranks: int) -> int:
        """What NVML counts that the caching allocator does not: context and NCCL buffers."""
        return self.context_bytes + self.nccl_bytes_for(ranks)

    def predict(
        self, allocated_bytes: int, reserved_bytes: int, ranks: int = 1
    ) -> tuple[int, int, int]:
        """(allocated, reserved, nvml) on this GPU, from the trace's allocator prediction."""
        allocated = allocated_bytes + self.workspaces_bytes()
        reserved = reserved_bytes + self.workspaces_reserved_bytes()
        return allocated, reserved, reserved + self.outside_allocator_bytes(ranks)

    def nvml_from_storage_bytes(self, storage_bytes: int, ranks: int = 1) -> int:
        """nvml where the allocator is not simulated (a ZeRO rank): the tensors' storage
        peak and the workspaces' segments beside what NVML adds. A lower bound: the caching
        allocator's rounding and cached blocks are left out."""
        return (
            storage_bytes + self.workspaces_reserved_bytes() + self.outside_allocator_bytes(ranks)
        )

    def to_dict(self, ranks: int = 1) -> dict[str, object]:
        return {
            "name": self.name,
            "capability": list(self.capability) if self.capability else None,
            "workspace_bytes": self.workspace_bytes,
            "workspaces": MATMUL_THREADS,
            "context_bytes": self.context_bytes,
            "nccl_bytes": self.nccl_bytes_for(ranks),
            "sources": [CONTEXT_SOURCE, NCCL_SOURCE] if ranks > 1 else [CONTEXT_SOURCE],
        }

    def describe(self, ranks: int = 1) -> str:
        """One line: what the prediction added, and from where."""
        parts = [
            f"{MATMUL_THREADS} cuBLAS workspaces of {self.workspace_bytes / MIB:,.3g} MiB",
            f"CUDA context {self.context_bytes / MIB:,.0f} MiB",
        ]
        if ranks > 1:
            parts.append(f"NCCL {self.nccl_bytes_for(ranks) / MIB:,.0f} MiB")
        return f"{self.name}: " + ", ".join(parts)


def _mib(name: str, value: float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**50:
        raise DeviceProfileError(f"{name}={value!r} is not a number of MiB >= 0")
    return round(value * MIB)
