"""NVML helpers: the pure logic and the sampler's thread everywhere, NVML itself only under --gpu.

NVML needs an NVIDIA driver, which CI machines do not have: the sampler tests replace it with a
``read`` function, and the tests of how starting or asking NVML fails with conftest's FakeNvml.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable, Iterator

import pynvml
import pytest
import torch

from conftest import FAKE_UUID, FakeNvml
from pytest_vram.errors import EXTRAS, extra, installed, missing_library
from pytest_vram.meters.nvml import (
    NvmlSampler,
    cuda_version_string,
    device_info,
    mig_mode,
    nvml_index,
    nvml_unavailable,
)

THREAD = "pytest-vram-nvml"
MIB = 2**20


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # what pynvml loads on Linux
    except OSError:
        return False
    return True


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


def _wait(event: threading.Event) -> None:
    assert event.wait(timeout=5), "the sampler thread did not read in time"


# -- availability ----------------------------------------------------------------------------


@pytest.mark.skipif(_driver_present(), reason="checks the message where there is no driver")
def test_unavailable_without_a_driver_says_why() -> None:
    reason = nvml_unavailable()
    assert reason is not None
    assert reason.startswith("NVML could not be initialised: ")
    assert "Not Found" in reason  # pynvml's own text: the shared library is missing
    assert reason.endswith("(no NVIDIA driver?)")


def test_unavailable_without_nvidia_ml_py_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    assert nvml_unavailable() == (
        "nvidia-ml-py is not installed: pip install 'nvidia-ml-py>=12' (pytest-vram's gpu extra)"
    )


def test_a_missing_library_is_one_line_naming_what_to_install() -> None:
    # The form every "is it installed?" check prints (cli, step, estimate, methods, NVML).
    # pytest-vram is not on PyPI: the line names the libraries, not "pytest-vram[zero]".
    zero = "'deepspeed>=0.16,<0.20' 'ninja>=1.11' (pytest-vram's zero extra)"
    assert missing_library("deepspeed", extra("zero")) == (
        f"deepspeed is not installed: pip install {zero}"
    )
    assert missing_library("DeepSpeed", extra("zero"), needed_by="zero=2 runs") == (
        f"zero=2 runs DeepSpeed, which is not installed: pip install {zero}"
    )


def test_each_extras_install_line_is_what_pyproject_declares() -> None:
    import shlex
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for name, line in EXTRAS.items():
        assert shlex.split(line) == declared[name], name


def test_installed_asks_without_importing() -> None:
    assert installed("pynvml") and installed("multiprocessing.connection")
    assert not installed("no_such_module_here")
    assert not installed("no_such_package_here.sub")  # its parent is missing: not an error
    assert "no_such_module_here" not in sys.modules


def test_cuda_meter_imports_and_builds_without_nvidia_ml_py() -> None:
    # A fresh interpreter: the lazy import must hold for the whole import chain.
    import subprocess

    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from pytest_vram.meters.cuda import CudaMeter\n"
        "from pytest_vram.meters.nvml import nvml_unavailable\n"
        "CudaMeter(peak_source='nvml')\n"
        "print(nvml_unavailable())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("nvidia-ml-py is not installed")


def test_nvidia_ml_pys_mismatch_error_is_no_nvml_error() -> None:
    # Why catching NVMLError is not enough: nvidia-ml-py raises this one beside it.
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda nvml: nvml.NVMLLibraryMismatchError("Unversioned function called"),
            "NVMLLibraryMismatchError: Unversioned function called",
        ),
        (lambda nvml: OSError("wrong ELF class"), "OSError: wrong ELF class"),
        (lambda nvml: AttributeError("no nvmlInit"), "AttributeError: no nvmlInit"),
        (lambda nvml: nvml.NVMLError(9), "NVML error 9 (no NVIDIA driver?)"),
    ],
    ids=["mismatch", "oserror", "attributeerror", "nvmlerror"],
)
def test_unavailable_names_any_failure_to_start(
    fake_nvml: FakeNvml, make: Callable[[FakeNvml], Exception], reason: str
) -> None:
    fake_nvml.fail["nvmlInit"] = make(fake_nvml)
    assert nvml_unavailable() == f"NVML could not be initialised: {reason}"
    del fake_nvml.fail["nvmlInit"]
    assert nvml_unavailable() is None  # a failed start is tried again
    assert nvml_unavailable() is None and fake_nvml.calls["nvmlInit"] == 2  # once it worked


def test_mig_mode_of_the_device(fake_nvml: FakeNvml) -> None:
    bare = FAKE_UUID.removeprefix("GPU-")  # as torch reports it
    assert mig_mode(0, uuid=bare) == "off"
    fake_nvml.mig_current = fake_nvml.NVML_DEVICE_MIG_ENABLE
    assert mig_mode(0, uuid=bare) == "on"
    fake_nvml.mig_current = fake_nvml.NVML_DEVICE_MIG_DISABLE
    fake_nvml.mig_device = True  # a MIG slice's handle
    assert mig_mode(0, uuid=bare) == "on"
    fake_nvml.mig_device = False
    fake_nvml.fail["nvmlDeviceGetMigMode"] = fake_nvml.NVMLError(3)  # a GPU without MIG
    assert mig_mode(0, uuid=bare) == "off"
    fake_nvml.fail["nvmlDeviceGetMigMode"] = fake_nvml.NVMLError(999)
    with pytest.raises(fake_nvml.NVMLError):
        mig_mode(0, uuid=bare)


@pytest.mark.skipif(_driver_present(), reason="checks the failure where there is no driver")
def test_nvml_calls_without_a_driver_raise_nvml_errors() -> None:
    with pytest.raises(pynvml.NVMLError):
        device_info(0)
    with pytest.raises(pynvml.NVMLError):
        with NvmlSampler(0):
            pass
    assert _sampler_threads() == []


# -- pure logic ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [(12040, "12.4"), (11080, "11.8"), (12000, "12.0"), (13010, "13.1")],
)
def test_cuda_version_string(code: int, expected: str) -> None:
    assert cuda_version_string(code) == expected


def test_cuda_version_string_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="CUDA version code 0 is not positive"):
        cuda_version_string(0)


UUID = "GPU-8a1b2c3d-0000-1111-2222-333344445555"
MIG = "MIG-0f1e2d3c-4444-5555-6666-777788889999"


@pytest.mark.parametrize(
    ("torch_index", "visible", "expected"),
    [
        (0, None, 0),  # unset: every device, in order
        (3, None, 3),
        (0, "2,3", 2),
        (1, "2,3", 3),
        (1, " 1 , 0 ", 0),
        (0, f"{UUID},1", UUID),
        (1, f"{MIG},0", 0),
        (0, MIG, MIG),
        (0, "GPU-8a1b", "GPU-8a1b"),  # a UUID prefix, looked up by prefix
        (1, "1,0,bogus,2", 0),
    ],
)
def test_nvml_index_follows_cuda_visible_devices(
    torch_index: int, visible: str | None, expected: int | str
) -> None:
    assert nvml_index(torch_index, visible) == expected


@pytest.mark.parametrize(
    ("torch_index", "visible", "message"),
    [
        (2, "0,1", r"torch device 2 is not visible: CUDA_VISIBLE_DEVICES='0,1' makes 2 device"),
        (0, "", "makes 0 device"),  # set but empty: no GPU at all
        (0, "-1", "makes 0 device"),  # a common way to hide every GPU
        (1, "0,bogus,2", "makes 1 device"),  # CUDA ignores the list from an invalid entry on
        (0, "GPU-", "makes 0 device"),
        (0, "1,1", "makes 0 device"),  # a repeated device hides every GPU
        (-1, None, "torch device index -1 is negative"),
    ],
)
def test_nvml_index_says_which_device_is_not_visible(
    torch_index: int, visible: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nvml_index(torch_index, visible)


# -- the sampler's thread, with NVML replaced by a read function ------------------------------


def _reader(values: list[int | None]) -> tuple[Callable[[], int | None], threading.Event]:
    """Reads ``values`` in turn, then repeats the last one; the event is set once all are read."""
    it: Iterator[int | None] = iter(values)
    done = threading.Event()
    last: list[int | None] = [None]

    def read() -> int | None:
        try:
            last[0] = next(it)
        except StopIteration:
            done.set()
        return last[0]

    return read, done


def test_sampler_thread_starts_and_is_gone_after_exit() -> None:
    readers: set[str] = set()
    ticks = threading.Event()

    def read() -> int:
        readers.add(threading.current_thread().name)
        if threading.current_thread().name == THREAD:
            ticks.set()
        return 1

    sampler = NvmlSampler(read=read, interval_s=0.001)
    with sampler:
        assert len(_sampler_threads()) == 1
        _wait(ticks)
    assert _sampler_threads() == []
    assert readers == {threading.current_thread().name, THREAD}  # entering reads once itself


def test_sampler_peak_is_the_largest_reading() -> None:
    read, done = _reader([10 * MIB, 50 * MIB, 20 * MIB, 5 * MIB])
    with NvmlSampler(read=read, interval_s=0.001) as sampler:
        _wait(done)
    assert sampler.peak_bytes == 50 * MIB
    assert sampler.last_bytes == 5 * MIB


def test_sampler_reset_starts_a_new_window() -> None:
    level = [100 * MIB]
    with NvmlSampler(read=lambda: level[0], interval_s=0.001) as sampler:
        assert sampler.peak_bytes == 100 * MIB
        level[0] = 10 * MIB
        sampler.reset()
        assert sampler.peak_bytes == 10 * MIB  # the reset window begins at a reading now
        level[0] = 30 * MIB
        assert sampler.sample() == 30 * MIB
        level[0] = 20 * MIB
        sampler.sample()
        assert sampler.peak_bytes == 30 * MIB


def test_sampler_none_is_no_reading() -> None:
    with NvmlSampler(read=lambda: None, interval_s=0.001) as sampler:
        assert sampler.sample() is None
    assert sampler.peak_bytes == 0 and sampler.last_bytes is None


def _failing_read(after: int) -> tuple[Callable[[], int], threading.Event]:
    """Fails once, at reading ``after + 1``; the event is set as it fails."""
    calls = [0]
    failed = threading.Event()

    def read() -> int:
        calls[0] += 1
        if calls[0] == after + 1:
            failed.set()
            raise OSError(f"reading {calls[0]} failed")
        return calls[0]

    return read, failed


def test_an_error_on_the_sampler_thread_is_raised_on_exit() -> None:
    read, failed = _failing_read(after=2)
    with pytest.raises(OSError, match="reading 3 failed"):
        with NvmlSampler(read=read, interval_s=0.001):
            _wait(failed)
    assert _sampler_threads() == []


def test_an_error_on_the_sampler_thread_is_raised_by_the_next_sample() -> None:
    read, failed = _failing_read(after=1)
    with NvmlSampler(read=read, interval_s=0.001) as sampler:
        _wait(failed)
        for thread in _sampler_threads():
            thread.join(timeout=5)  # the failure ends the thread, once it has handed it over
        assert _sampler_threads() == []
        with pytest.raises(OSError, match="reading 2 failed"):
            sampler.sample()
        # raised once: the thread has stopped, and reading again works
        assert sampler.sample() == 3


def test_the_body_error_wins_over_the_sampler_error() -> None:
    # The worker classifies a failure (an OOM, say) by the step's own exception.
    read, failed = _failing_read(after=1)
    with pytest.raises(KeyError) as raised:
        with NvmlSampler(read=read, interval_s=0.001):
            _wait(failed)
            raise KeyError("the step failed")
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["NVML sampling also failed: OSError('reading 2 failed')"]


def test_sampler_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="interval_s must be positive, got 0"):
        NvmlSampler(read=lambda: 1, interval_s=0)
    sampler = NvmlSampler(read=lambda: 1)
    with pytest.raises(RuntimeError, match="only inside its with block"):
        sampler.sample()
    with sampler:
        with pytest.raises(RuntimeError, match="already running"):
            sampler.__enter__()
    assert _sampler_threads() == []


# -- the real thing ----------------------------------------------------------------------------


#
# Devices are looked up by torch's UUID: on a host with mixed GPUs, CUDA's default order (fastest
# first) and NVML's (PCI bus) give the same index to different GPUs.


@pytest.fixture
def torch_uuid() -> str:
    reason = nvml_unavailable()
    if reason is not None:
        pytest.fail(f"--gpu runs need NVML: {reason}")
    return str(torch.cuda.get_device_properties(0).uuid)


@pytest.mark.gpu(inprocess=True)
def test_device_info_names_torchs_device(torch_uuid: str) -> None:
    props = torch.cuda.get_device_properties(0)
    info = device_info(0, uuid=torch_uuid)
    assert info.name == props.name  # both read the driver's name
    assert abs(info.total_bytes - props.total_memory) < 0.1 * info.total_bytes
    assert info.uuid.startswith(("GPU-", "MIG-")) and info.uuid.endswith(torch_uuid)
    assert info.cuda_driver_version.count(".") == 1
    assert mig_mode(0, uuid=torch_uuid) in ("on", "off")


@pytest.mark.gpu(inprocess=True)
def test_sampler_sees_this_process_allocate(torch_uuid: str) -> None:
    torch.cuda.synchronize()  # a CUDA context first, or NVML does not list the process
    with NvmlSampler(0, uuid=torch_uuid) as sampler:
        before = sampler.peak_bytes
        block = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        sampler.sample()
        assert sampler.peak_bytes >= before + 256 * MIB
    del block
    assert sampler.per_process == (sampler.note is None)
    assert _sampler_threads() == []
