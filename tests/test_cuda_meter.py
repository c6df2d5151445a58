"""The cuda meter: its logic everywhere, its measurements only under --gpu."""

from __future__ import annotations

import pytest
import torch

from pytest_vram import StepSpec
from pytest_vram.meters.cuda import CudaMeter, fingerprint_from_name, storage_bytes
from pytest_vram.step import run_step


@pytest.mark.parametrize(
    ("name", "total_gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 80, "nvidia-h100-80gb-hbm3"),
        ("NVIDIA GeForce RTX 4090", 24, "nvidia-geforce-rtx-4090-24gb"),
        ("Tesla V100-SXM2-32GB", 32, "nvidia-tesla-v100-sxm2-32gb"),
        ("NVIDIA A100-SXM4-40GB", 40, "nvidia-a100-sxm4-40gb"),
        ("???", 16, "nvidia-gpu-16gb"),
    ],
)
def test_fingerprint_is_a_readable_folder_name(name: str, total_gib: int, expected: str) -> None:
    assert fingerprint_from_name(name, total_gib * 2**30) == expected


def test_storage_bytes_counts_shared_storage_once() -> None:
    base = torch.zeros(1000)  # 4000 bytes
    view = base[10:20]
    other = torch.zeros(10, dtype=torch.bfloat16)  # 20 bytes
    seen: set[int] = set()
    assert storage_bytes([base, view, other], seen) == 4020
    assert storage_bytes([view], seen) == 0  # already counted in another role


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is visible")
def test_entering_without_a_gpu_says_so() -> None:
    with pytest.raises(RuntimeError, match="needs a visible GPU"):
        with CudaMeter():
            pass


@pytest.mark.gpu
def test_cuda_step_breakdown_adds_up() -> None:
    spec = StepSpec(model="tiny-llama", precision="fp32", batch=2, seq=64)
    r = run_step(spec, CudaMeter())
    b = r.breakdown
    assert r.meter == "cuda" and r.device.startswith("nvidia-")
    assert b.param_bytes == 4 * r.total_params
    assert b.optimizer_bytes >= 2 * b.param_bytes  # exp_avg + exp_avg_sq (+ step scalars)
    assert r.reserved_bytes is not None and r.reserved_bytes >= r.peak_bytes
    assert b.total_bytes == r.peak_bytes


@pytest.mark.gpu
def test_cuda_peak_is_close_to_the_host_meter() -> None:
    # The host meter counts tensor storage exactly; the caching allocator rounds blocks up.
    from pytest_vram.meters.host import HostMeter

    spec = StepSpec(model="tiny-llama", precision="fp32", batch=2, seq=64)
    host = run_step(spec, HostMeter())
    cuda = run_step(spec, CudaMeter())
    assert host.peak_bytes <= cuda.peak_bytes <= host.peak_bytes * 1.25
