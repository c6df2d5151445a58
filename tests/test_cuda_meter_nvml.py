"""The cuda meter with NVML optional: what it does when NVML is missing, broken or fails.

torch.cuda and pynvml are replaced by conftest's FakeCuda and FakeNvml (no GPU or NVIDIA driver
here); the meter code between them is the real one.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import pytest
import torch

from conftest import GIB, FakeCuda, FakeNvml
from pytest_vram.meters.base import Roles
from pytest_vram.meters.cuda import CudaMeter
from pytest_vram.result import StepMeasure

NO_ROLES = Roles(params=[], buffers=[], grads=[], optimizer=[])


def _step(meter: CudaMeter) -> StepMeasure:
    meter.step_begin()
    return meter.step_end(NO_ROLES)


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pytest-vram-nvml"]


def _wait_for_the_sampler_thread_to_fail() -> None:
    for thread in _sampler_threads():  # a failed reading ends the thread
        thread.join(timeout=5)
    assert _sampler_threads() == []


def test_fingerprint_is_torchs_with_and_without_nvml(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cuda.props.total_memory = int(23.4 * GIB)
    fake_nvml.name = fake_cuda.props.name
    fake_nvml.total_bytes = int(23.6 * GIB)  # NVML's total rounds to another GiB
    with_nvml = CudaMeter().fingerprint()
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert CudaMeter().fingerprint() == with_nvml == "nvidia-geforce-rtx-4090-23gb"


INIT_FAILURES: list[tuple[Callable[[FakeNvml], Exception], str]] = [
    (lambda nvml: nvml.NVMLLibraryMismatchError("Unversioned function called"), "Mismatch"),
    (lambda nvml: OSError("libnvidia-ml.so.1: wrong ELF class"), "OSError: libnvidia"),
    (lambda nvml: AttributeError("module has no attribute 'nvmlInit'"), "AttributeError"),
    (lambda nvml: nvml.NVMLError(9), "NVML error 9 (no NVIDIA driver?)"),
]


@pytest.mark.parametrize(
    ("make", "says"), INIT_FAILURES, ids=["mismatch", "oserror", "attributeerror", "nvmlerror"]
)
def test_nvml_that_cannot_start_is_a_note(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml, make: Callable[[FakeNvml], Exception], says: str
) -> None:
    fake_nvml.fail["nvmlInit"] = make(fake_nvml)
    with CudaMeter() as meter:
        steps = [_step(meter), _step(meter)]
        environment = meter.environment()
    assert [(m.nvml_bytes, m.allocated_bytes, m.peak_bytes) for m in steps] == 2 * [
        (None, fake_cuda.allocated_bytes, fake_cuda.reserved_bytes)
    ]
    assert len(meter.notes) == 1, meter.notes
    assert meter.notes[0].startswith("no NVML numbers: NVML could not be initialised: ")
    assert says in meter.notes[0]
    assert environment["nvml"] == "unavailable" and "nvidia-driver" not in environment
    with pytest.raises(RuntimeError, match="peak_source 'nvml' needs NVML: NVML could not be"):
        with CudaMeter(peak_source="nvml"):
            pass


def test_a_device_nvml_does_not_list_is_a_note(fake_cuda: FakeCuda, fake_nvml: FakeNvml) -> None:
    fake_cuda.props.uuid = "0f1e2d3c-4444-5555-6666-777788889999"  # a MIG slice, a vGPU
    with CudaMeter() as meter:
        m = _step(meter)
        assert _sampler_threads() == []
    assert m.nvml_bytes is None and m.reserved_bytes == fake_cuda.reserved_bytes
    assert meter.notes == [
        "no NVML numbers: starting NVML sampling failed (LookupError: 0 NVML devices have a "
        "UUID starting with '0f1e2d3c-4444-5555-6666-777788889999')"
    ]
    with pytest.raises(RuntimeError, match=r"needs NVML, but starting NVML sampling failed: Look"):
        with CudaMeter(peak_source="nvml"):
            pass


def test_a_reading_that_fails_mid_case_is_one_note(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml
) -> None:
    with CudaMeter() as meter:
        first = _step(meter)
        fake_nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = OSError("GPU is lost")
        later = [_step(meter), _step(meter)]
        assert _sampler_threads() == []
    assert first.nvml_bytes == fake_nvml.used_bytes
    assert [(m.nvml_bytes, m.allocated_bytes) for m in later] == 2 * [
        (None, fake_cuda.allocated_bytes)
    ]
    assert meter.notes == [
        "no NVML numbers from this step on: NVML sampling failed (OSError: GPU is lost)"
    ]
    assert meter.environment()["nvml"] == "per-process"  # what entering found


def test_with_the_nvml_peak_a_failed_reading_is_an_error(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml
) -> None:
    with pytest.raises(RuntimeError, match=r"needs NVML, but NVML sampling failed: OSError: lost"):
        with CudaMeter(peak_source="nvml") as meter:
            assert _step(meter).peak_bytes == fake_nvml.used_bytes
            fake_nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = OSError("lost")
            _step(meter)
    assert _sampler_threads() == []


@pytest.mark.parametrize("peak_source", ["reserved", "nvml"])
def test_a_reading_that_fails_after_the_last_step(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml, peak_source: str
) -> None:
    meter = CudaMeter(peak_source=peak_source).__enter__()
    _step(meter)
    fake_nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = OSError("lost")
    _wait_for_the_sampler_thread_to_fail()  # its error waits for the exit to pick it up
    if peak_source == "nvml":
        with pytest.raises(RuntimeError, match="needs NVML, but NVML sampling failed: OSError"):
            meter.__exit__(None, None, None)
    else:
        meter.__exit__(None, None, None)
        assert meter.notes == [
            "NVML numbers may miss the last step: NVML sampling failed (OSError: lost)"
        ]


def test_driver_and_mig_failures_are_notes_once(fake_cuda: FakeCuda, fake_nvml: FakeNvml) -> None:
    fake_nvml.fail["nvmlSystemGetDriverVersion"] = fake_nvml.NVMLLibraryMismatchError("mismatch")
    fake_nvml.fail["nvmlDeviceGetMigMode"] = OSError("no MIG")
    meter = CudaMeter()
    with meter:
        versions = meter.versions()
        environment = meter.environment()
        assert meter.versions() == versions and meter.environment() == environment
    assert not {"nvidia-driver", "cuda-driver", "mig"} & {*versions, *environment}
    assert environment["nvml"] == "per-process"
    assert meter.notes == [
        "no driver version: reading the driver version failed (NVMLLibraryMismatchError: mismatch)",
        "no MIG mode: reading the MIG mode failed (OSError: no MIG)",
    ]
    with pytest.raises(RuntimeError, match="needs NVML, but reading the driver version failed"):
        CudaMeter(peak_source="nvml").versions()


def test_environment_names_driver_device_and_how_nvml_saw_the_process(
    fake_cuda: FakeCuda, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    meter = CudaMeter()
    assert "nvml" not in meter.environment()  # not known before entering
    with meter:
        environment = meter.environment()
    expected = {"capability": "8.9", "nvidia-driver": "550.54.15", "cuda-driver": "12.4"}
    expected |= {"mig": "off", "nvml": "per-process"}
    if torch.version.cuda:
        expected["cuda-runtime"] = torch.version.cuda
    assert {k: v for k, v in environment.items() if not k.startswith("env:")} == expected
    assert environment["env:PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert meter.environment() == environment  # outside too: what the last entering found
    assert meter.notes == []


@pytest.mark.parametrize(
    ("setup", "nvml"),
    [
        ("not listed", "device-wide"),  # a container's PID namespace
        ("no nvidia-ml-py", "unavailable"),
        ("sample_nvml=False", "off"),
    ],
)
def test_environment_says_when_nvml_did_not_see_the_process(
    fake_cuda: FakeCuda,
    fake_nvml: FakeNvml,
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    nvml: str,
) -> None:
    fake_nvml.listed = setup != "not listed"
    if setup == "no nvidia-ml-py":
        monkeypatch.setitem(sys.modules, "pynvml", None)
    with CudaMeter(sample_nvml=setup != "sample_nvml=False") as meter:
        environment = meter.environment()
    assert environment["nvml"] == nvml
    assert ("mig" in environment) == (setup != "no nvidia-ml-py")
