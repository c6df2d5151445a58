"""The cuda meter: its logic everywhere, its measurements only under --gpu."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import FakeCuda
from pytest_vram import StepSpec
from pytest_vram.meters.base import Roles
from pytest_vram.meters.cuda import (
    PEAK_SOURCES,
    CudaMeter,
    cudnn_version_string,
    env_entries,
    fingerprint_from_name,
    snapshot_filename,
    storage_bytes,
)
from pytest_vram.meters.nvml import nvml_unavailable
from pytest_vram.result import MemoryResult, StepMeasure
from pytest_vram.step import run_step

MIB = 2**20
NO_ROLES = Roles(params=[], buffers=[], grads=[], optimizer=[])


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


def test_storage_bytes_on_the_device_skips_host_tensors() -> None:
    host = torch.zeros(1000)  # offloaded state, say
    assert storage_bytes([host], set(), "cuda") == 0
    assert storage_bytes([host], set(), "cpu") == 4000


def test_offloaded_host_tensors_are_host_bytes_once_each() -> None:
    meter = CudaMeter(sample_nvml=False)
    state = torch.zeros(1000)
    meter.offloaded([state, state[:10], torch.zeros(10, dtype=torch.bfloat16)])
    meter.offloaded([state])  # noted again after the next step: not counted twice
    assert sum(meter._host.values()) == 4020


def test_snapshot_filename_is_the_label_made_safe_and_unique() -> None:
    name = snapshot_filename("tiny-llama lora adamw bf16 b1 s32")
    assert re.fullmatch(r"tiny-llama-lora-adamw-bf16-b1-s32-[0-9a-f]{8}\.pickle", name), name
    assert snapshot_filename("x") != snapshot_filename("x")


@pytest.mark.parametrize(
    "label", ["../../etc/passwd", 'a/b\\c:d*e?f<g>h|i"j', ".hidden", "CON", "ünï cödé", ""]
)
def test_snapshot_filename_is_safe_on_any_file_system(label: str) -> None:
    name = snapshot_filename(label)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9a-f]{8}\.pickle", name), name
    assert os.path.basename(name) == name


def test_snapshot_filename_of_no_label_or_a_long_one() -> None:
    assert re.fullmatch(r"snapshot-[0-9a-f]{8}\.pickle", snapshot_filename(""))
    long = snapshot_filename("tiny-llama " * 50)
    assert len(long) <= 80 + len("-12345678.pickle") and long.startswith("tiny-llama-tiny")


@pytest.mark.parametrize(
    ("code", "expected"), [(90100, "9.1.0"), (90501, "9.5.1"), (8902, "8.9.2"), (8600, "8.6.0")]
)
def test_cudnn_version_string(code: int, expected: str) -> None:
    assert cudnn_version_string(code) == expected


def test_peak_source_must_be_known() -> None:
    assert PEAK_SOURCES == ("allocated", "reserved", "nvml")
    assert CudaMeter().peak_source == "reserved"
    assert CudaMeter(peak_source="allocated").peak_source == "allocated"
    with pytest.raises(ValueError, match="peak_source 'max' is not one of allocated, reserved"):
        CudaMeter(peak_source="max")
    with pytest.raises(ValueError, match="peak_source 'nvml' needs sample_nvml=True"):
        CudaMeter(peak_source="nvml", sample_nvml=False)


def test_device_comes_from_local_rank_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert CudaMeter().device == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "3")
    meter = CudaMeter()
    assert (meter.device_index, meter.device) == (3, "cuda:3")
    assert CudaMeter(device_index=1).device == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "rank0")
    with pytest.raises(ValueError, match="LOCAL_RANK='rank0' is not a device index"):
        CudaMeter()
    with pytest.raises(ValueError, match="device_index -1 is negative"):
        CudaMeter(device_index=-1)


def test_versions_name_only_what_is_there() -> None:
    versions = CudaMeter().versions()
    assert ("torch-cuda" in versions) == (torch.version.cuda is not None)
    assert (
        ("nvidia-driver" in versions) == ("cuda-driver" in versions) == (nvml_unavailable() is None)
    )
    assert ("cudnn" in versions) == bool(torch.backends.cudnn.version())  # type: ignore[no-untyped-call]
    assert all(isinstance(v, str) and v for v in versions.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is visible")
def test_entering_without_a_gpu_says_so() -> None:
    with pytest.raises(RuntimeError, match="needs a visible GPU"):
        with CudaMeter():
            pass


# -- the meter's logic without a GPU: torch.cuda replaced (conftest's FakeCuda) ----------------


def _step(meter: CudaMeter) -> StepMeasure:
    meter.step_begin()
    return meter.step_end(NO_ROLES)


def test_only_the_first_step_empties_the_cache(fake_cuda: FakeCuda) -> None:
    meter = CudaMeter(sample_nvml=False)
    for _ in range(2):  # each entering is a new case, whose model is built before step 1
        fake_cuda.calls.clear()
        with meter:
            assert fake_cuda.calls == ["set_device", "synchronize", "empty_cache"]
            fake_cuda.calls.clear()
            _step(meter)
            assert fake_cuda.calls == [
                "synchronize",
                "empty_cache",  # what building the model left cached is not training's
                "reset_peak_memory_stats",
                "synchronize",
            ]
            fake_cuda.calls.clear()
            _step(meter)
            _step(meter)
            assert "empty_cache" not in fake_cuda.calls  # step 1's cache is what training holds


def test_env_entries_keep_what_moves_the_numbers() -> None:
    environ = {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "NCCL_P2P_DISABLE": "1",
        "NCCL_ALGO": "Ring",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "3",  # differs between xdist workers: not an entry
        "CUDA_MODULE_LOADING": "",  # empty: the default
        "HOME": "/root",
    }
    assert env_entries(environ) == {
        "env:CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "env:CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "env:NCCL_ALGO": "Ring",
        "env:NCCL_P2P_DISABLE": "1",
        "env:PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    assert list(env_entries(environ)) == sorted(env_entries(environ))


# -- the real thing, under --gpu ----------------------------------------------------------------
#
# Cases go through the plugin's worker (conftest's gpu_case), as a session measures them;
# tests marked inprocess=True use CUDA in the pytest process and run after all others.


@pytest.mark.gpu
def test_cuda_step_breakdown_adds_up(gpu_case: Callable[..., MemoryResult]) -> None:
    spec = StepSpec(model="tiny-llama", precision="fp32", batch=2, seq=64)
    r = gpu_case(spec)
    b = r.breakdown
    assert r.meter == "cuda" and r.device.startswith("nvidia-")
    assert b.param_bytes == 4 * r.total_params
    assert b.optimizer_bytes >= 2 * b.param_bytes  # exp_avg + exp_avg_sq (+ step scalars)
    assert r.reserved_bytes is not None and r.reserved_bytes >= r.peak_bytes
    assert b.total_bytes == r.peak_bytes


@pytest.mark.gpu(inprocess=True)  # reads cuBLAS's workspace sizes, which asks the device
def test_cuda_peak_is_close_to_the_host_meter(gpu_case: Callable[..., MemoryResult]) -> None:
    # The host meter counts tensor storage exactly, as torch's CPU kernels allocate it; the
    # CUDA step holds more, by amounts each bounded below.
    from pytest_vram import zoo
    from pytest_vram.meters.host import HostMeter

    spec = StepSpec(model="tiny-llama", precision="fp32", batch=2, seq=64)
    host = run_step(spec, HostMeter())
    cuda = gpu_case(spec, peak_source="allocated", sample_nvml=False)
    sizes = [p.nbytes for p in zoo.build_model(spec.model, torch.float32, "meta").parameters()]
    assert cuda.trainable_params * 4 == sum(sizes)  # full fine-tuning in fp32
    # AdamW runs foreach on CUDA, one tensor at a time on CPU: _multi_tensor_adam's
    # _foreach_sqrt(exp_avg_sqs) holds a temporary for every parameter at once.
    foreach = sum(sizes)
    # cuBLAS (and cuBLASLt, unless it shares cuBLAS's, torch's default) keeps a workspace per
    # handle and stream, taken from the caching allocator at the first matmul: one for the
    # forward's thread, one for autograd's device thread running the backward.
    cuda_backends = torch.backends.cuda
    workspaces = 2 * (
        cuda_backends.cublas_workspace_size() + cuda_backends.cublaslt_workspace_size()
    )
    # The allocator rounds a request up to 512 bytes, and hands out a cached block unsplit when
    # less than 512 bytes (requests up to 1 MiB) or 1 MiB (larger ones) would remain: at the peak
    # each parameter has five such blocks (weight, gradient, two moments, the foreach
    # temporary), the workspaces are large ones, and a few hundred small ones are activations.
    large = 5 * sum(size > MIB for size in sizes) + 4
    small = 5 * sum(size <= MIB for size in sizes) + 256
    rounding = large * (MIB + 512) + small * 1024
    # The host step's own extras: the CPU loop's temporaries (two of one parameter, fewer than
    # foreach's one of each) and the optimizer's step counters, which stay on the host with
    # CUDA parameters too (4 bytes each) and so count on the host meter only.
    counters = 4 * len(sizes)
    assert host.peak_bytes - counters <= cuda.peak_bytes
    assert cuda.peak_bytes <= host.peak_bytes + foreach + workspaces + rounding


@pytest.mark.gpu
def test_cuda_step_with_the_nvml_peak(gpu_case: Callable[..., MemoryResult]) -> None:
    if reason := nvml_unavailable():
        pytest.fail(f"--gpu runs need NVML: {reason}")
    spec = StepSpec(model="tiny-llama", precision="fp32", batch=2, seq=64)
    r = gpu_case(spec, peak_source="nvml")
    assert r.reserved_bytes is not None and r.peak_bytes > r.reserved_bytes
    assert r.breakdown.total_bytes == r.peak_bytes
    assert not [note for note in r.notes if "failed" in note], r.notes


def _gpu_step(meter: CudaMeter) -> tuple[torch.Tensor, Roles]:
    """A step's worth of allocations: 64 MiB of weights, a 64 MiB gradient, 64 MiB of temporaries."""
    weight = torch.ones(4096, 4096, device=meter.device, requires_grad=True)
    meter.step_begin()
    weight.grad = torch.ones_like(weight)
    x = torch.randn(2048, 4096, device=meter.device)
    y = x @ weight.detach()
    del x, y
    return weight, Roles(params=[weight], buffers=[], grads=[weight.grad], optimizer=[])


@pytest.mark.gpu(inprocess=True)
def test_peak_sources_order_allocated_reserved_nvml() -> None:
    for source in PEAK_SOURCES:
        if source == "nvml" and nvml_unavailable():
            continue
        with CudaMeter(peak_source=source) as meter:
            _weight, roles = _gpu_step(meter)
            m = meter.step_end(roles)
        assert m.allocated_bytes is not None and m.reserved_bytes is not None
        assert 192 * MIB <= m.allocated_bytes <= m.reserved_bytes
        chosen = {
            "allocated": m.allocated_bytes,
            "reserved": m.reserved_bytes,
            "nvml": m.nvml_bytes,
        }
        assert m.peak_bytes == chosen[source]
        assert m.breakdown.param_bytes == m.breakdown.grad_bytes == 64 * MIB
        assert m.breakdown.total_bytes == m.peak_bytes
        if nvml_unavailable() is None:
            # NVML counts the whole process: the reserved blocks plus the CUDA context.
            assert m.nvml_bytes is not None and m.nvml_bytes >= m.reserved_bytes
        else:
            assert m.nvml_bytes is None
        del _weight, roles


@pytest.mark.gpu(inprocess=True)
def test_only_the_first_step_starts_without_the_cache() -> None:
    with CudaMeter(sample_nvml=False) as meter:
        built = torch.empty(512 * MIB, dtype=torch.uint8, device=meter.device)
        del built  # what building a model leaves cached
        first = _step(meter)
        block = torch.empty(256 * MIB, dtype=torch.uint8, device=meter.device)
        del block  # cached by step 1: training holds it from here on
        second = _step(meter)
    assert first.reserved_bytes is not None and first.reserved_bytes < 256 * MIB
    assert second.reserved_bytes is not None and second.reserved_bytes >= 256 * MIB


@pytest.mark.gpu(inprocess=True)
def test_snapshot_is_written_and_loads(tmp_path: Path) -> None:
    meter = CudaMeter(snapshot_dir=str(tmp_path / "snapshots"))
    meter.snapshot_label = "tiny case b1"
    with meter:
        _weight, roles = _gpu_step(meter)
        meter.step_end(roles)
    assert meter.snapshot_path is not None
    path = Path(meter.snapshot_path)
    assert path.parent == tmp_path / "snapshots" and path.name.startswith("tiny-case-b1-")
    with path.open("rb") as f:
        snapshot = pickle.load(f)
    assert (
        snapshot["segments"] and snapshot["device_traces"][meter.device_index]
    )  # what memory_viz draws


@pytest.mark.gpu(inprocess=True)
def test_gpu_fingerprint_versions_environment_and_visibility() -> None:
    if reason := nvml_unavailable():
        pytest.fail(f"--gpu runs need NVML: {reason}")
    meter = CudaMeter()
    props = torch.cuda.get_device_properties(meter.device_index)
    assert meter.fingerprint() == fingerprint_from_name(props.name, props.total_memory)
    versions = meter.versions()
    assert versions["torch-cuda"] == torch.version.cuda
    assert re.fullmatch(r"\d+\.\d+", versions["cuda-driver"])
    with meter:
        environment = meter.environment()
    assert environment["capability"] == f"{props.major}.{props.minor}"
    assert environment["cuda-runtime"] == torch.version.cuda
    assert environment["cuda-driver"] == versions["cuda-driver"]
    assert environment["mig"] in ("on", "off")
    assert environment["nvml"] in ("per-process", "device-wide")
    assert not [note for note in meter.notes if "failed" in note], meter.notes
    with pytest.raises(RuntimeError, match="is not visible"):
        with CudaMeter(device_index=torch.cuda.device_count()):
            pass
