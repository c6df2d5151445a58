"""The traced steps and constants behind ``reference_table.py``'s rows: each published
source's configuration, what ours reads from its trace, and the GPU the nvidia-smi column is
predicted on. Traces are cached per spec for the run.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

# Imported before any fake trace: a module imported inside the meter would keep fake tensors.
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401

from pytest_vram import StepSpec, references
from pytest_vram.device_profile import DeviceProfile
from pytest_vram.estimate import base_params, deepspeed_figure
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.result import GIB, MemoryResult
from pytest_vram.step import run_step

_RESULTS: dict[StepSpec, MemoryResult] = {}


def traced(**fields: Any) -> MemoryResult:
    spec = StepSpec(**fields)
    if spec not in _RESULTS:
        start = time.perf_counter()
        _RESULTS[spec] = run_step(spec, FakeMeter())
        print(f"  traced {spec.label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return _RESULTS[spec]


def gib(nbytes: float) -> float:
    return nbytes / GIB


# The GPU of a source that names none: pre-Hopper cuBLAS workspaces, published context and NCCL.
DEVICE = DeviceProfile.named(None, {})
Device = tuple[float | None, float | None]  # (reserved, nvidia-smi) GiB


@dataclasses.dataclass(frozen=True)
class Row:
    source: str
    what: str
    published: float | str  # GiB, or what the source reports instead (e.g. "OOM")
    ours: Callable[[], float | str]
    deepspeed: Callable[[], float | None] = lambda: None
    llama_factory: float | None = None
    note: str = ""
    kind: str = "allocated"  # what the published figure counts: allocated, nvidia-smi, estimate
    device: Callable[[], Device] = lambda: (None, None)


# LOMO paper, Table 1: LLaMA-7B, fp16, b8 s512, one GPU; eager attention as in 2023.
LOMO: dict[str, Any] = {"model": "llama-7b", "method": "full", "precision": "fp16"}
LOMO_STEP: dict[str, Any] = {**LOMO, "batch": 8, "seq": 512, "attention": "eager"}


def weights() -> MemoryResult:
    return traced(**LOMO, seq=16)


def state(optimizer: str) -> int:
    return traced(**LOMO, seq=16, optimizer=optimizer, zero=0).ranks[0].breakdown.optimizer_bytes


def activations(ckpt: bool) -> int:
    r = traced(**LOMO_STEP, optimizer="lomo", grad_ckpt=ckpt)
    return r.peak_bytes - r.breakdown.param_bytes - r.breakdown.buffer_bytes


def lomo_total(optimizer: str) -> float:
    w = weights().breakdown
    return gib(w.param_bytes + w.grad_bytes + state(optimizer) + activations(True))


def ds_single_gpu_zero2() -> float | None:
    spec = StepSpec(**LOMO, zero=2, ranks=1)
    figure = deepspeed_figure(spec, weights().total_params, 0)
    return None if isinstance(figure, str) else gib(figure.gpu_bytes)


# DeepSpeed's estimator output for Qwen2.5-32B full fine-tuning on H100s (LLaMA-Factory
# discussion, 2025), on 1 GPU (the article's count, without lm_head); ours traces b1 s1024 with
# checkpointing (the article gives no batch).
QWEN_32B_H100: dict[str, Any] = {
    "model": "qwen2.5-32b",
    "method": "full",
    "batch": 1,
    "seq": 1024,
    "grad_ckpt": True,
}


def qwen_32b_h100(offload: str, host: bool = False) -> float:
    r = traced(**QWEN_32B_H100, zero=3, offload=offload, ranks=1)
    return gib(r.host_offload_bytes if host else r.peak_bytes)


def qwen_32b_h100_ds(offload: str, host: bool = False) -> Callable[[], float | None]:
    def figure() -> float | None:
        spec = StepSpec(**QWEN_32B_H100, zero=3, offload=offload, ranks=1)
        f = deepspeed_figure(
            spec, references.QWEN_32B_DEEPSPEED_PARAMS, references.QWEN_32B_DEEPSPEED_LARGEST_LAYER
        )
        return None if isinstance(f, str) else gib(f.cpu_bytes if host else f.gpu_bytes)

    return figure


# LLaMA-Factory users' 8-GPU measurements (Juejin article, 2025): ZeRO-3, bf16, checkpointing,
# batch 2; summed over the GPUs. The article does not give the sequence length: ours traces
# 1024 tokens.
EIGHT_GPU: dict[str, Any] = {
    "precision": "bf16",
    "batch": 2,
    "seq": 1024,
    "grad_ckpt": True,
    "zero": 3,
    "ranks": 8,
}


def eight_gpu(model: str, method: str, **extra: Any) -> Callable[[], float | str]:
    def summed() -> float | str:
        r = traced(**{**EIGHT_GPU, "model": model, "method": method, **extra})
        total = gib(sum(rank.peak_bytes for rank in r.ranks))
        return f"OOM ({gib(r.peak_bytes):.1f}/rank)" if r.peak_bytes > 48 * GIB else total

    return summed


def eight_gpu_ds(model: str) -> Callable[[], float | None]:
    def figure() -> float | None:
        r = traced(**{**EIGHT_GPU, "model": model, "method": "full"})
        spec = StepSpec(**{**EIGHT_GPU, "model": model})
        f = deepspeed_figure(spec, r.total_params, base_params(model)[1])
        return None if isinstance(f, str) else 8 * gib(f.gpu_bytes)

    return figure


def qlora_weights(model: str) -> float:
    r = traced(model=model, method="qlora", grad_ckpt=True, seq=2048)
    return gib(r.breakdown.param_bytes + r.breakdown.buffer_bytes)


def peak(**fields: Any) -> Callable[[], float]:
    return lambda: gib(traced(**fields).peak_bytes)


def device(**fields: Any) -> Callable[[], Device]:
    """A single-GPU trace on ``DEVICE``: reserved and nvidia-smi."""

    def figures() -> Device:
        r = traced(**fields)
        if r.allocated_bytes is None or r.reserved_bytes is None:
            return None, None
        _, reserved, nvml = DEVICE.predict(r.allocated_bytes, r.reserved_bytes)
        return gib(reserved), gib(nvml)

    return figures


def eight_gpu_device(model: str, method: str, **extra: Any) -> Callable[[], Device]:
    """nvidia-smi summed over the 8 simulated ranks, each from its storage peak."""

    def figures() -> Device:
        r = traced(**{**EIGHT_GPU, "model": model, "method": method, **extra})
        return None, gib(sum(DEVICE.nvml_from_storage_bytes(x.peak_bytes, 8) for x in r.ranks))

    return figures


# DeepSpeed issue 4527: 6,805M parameters (131M the largest layer), 1 node x 4 GPUs, ZeRO-3
# offloading parameters and optimizer; nvidia-smi MiB. The same run's DeepSpeed log (DeepSpeed
# issue 4528, same author and day) prints reserved 13.01 GiB and allocated 0.31 GiB after
# initialize: the fp16 model was on the GPU before initialize, and the allocator kept its
# blocks. The issue gives no architecture, batch or sequence, so its steps are not modelled.
DS_4527_PARAMS, DS_4527_LARGEST = 6_805_000_000, 131_000_000
DS_4527_INIT_MIB, DS_4527_STEP_MIB, DS_4527_RESERVED_GIB = 14_678, 21_272, 13.01


def ds_4527() -> float | None:
    spec = StepSpec(model="llama-7b", zero=3, offload="both", ranks=4)
    figure = deepspeed_figure(spec, DS_4527_PARAMS, DS_4527_LARGEST)
    return None if isinstance(figure, str) else gib(figure.gpu_bytes)


def outside_4_ranks() -> float:
    return gib(DEVICE.outside_allocator_bytes(4))
