"""Shared helpers for the plugin tests: a pytester project that records and checks baselines.

``vram_project`` works like pytest-regressions' fixtures, from the outside: write a test module,
run it with ``--vram-update`` to record its baselines, then run it again to check them. Runs are
in-process (``pytester.runpytest``); each measured case still forks the plugin's worker child.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver  # noqa: F401 - see below
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_vram.result import MemoryResult
    from pytest_vram.spec import StepSpec

# Imported here, outside any pytester run: pytester restores sys.modules after each in-process
# run, and a multiprocessing.forkserver first imported inside a run would be dropped with its
# server handle, so every test would start (and pay for) a new torch-preloading server.

# The cheapest real case: tiny-llama, one sequence of 32 tokens, full fine-tuning with AdamW.
SMALL = 'model="tiny-llama", batch=1, seq=32'
LABEL = "tiny-llama full adamw bf16 b1 s32"
GIB = 2**30
# A 2-layer decoder at width 64, in transformers' config keys: architectures shrunk to this
# build and step in a second on the host meter.
TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def output(result: pytest.RunResult) -> str:
    """Everything the run printed, stdout then stderr."""
    return "\n".join([*result.outlines, *result.errlines])


class VramProject:
    """One pytester directory holding a test module, its rootdir ini and its baselines."""

    def __init__(self, pytester: pytest.Pytester, module: str = "test_mem") -> None:
        self.pytester = pytester
        self.module = module
        self.ini()

    @property
    def path(self) -> Path:
        return self.pytester.path

    def ini(self, **options: str) -> Path:
        """(Re)write the project's ini; it also pins the rootdir to the project directory."""
        lines = ["[pytest]", *(f"{key} = {value}" for key, value in options.items())]
        return self.pytester.makeini("\n".join(lines) + "\n")

    def write(self, source: str, name: str | None = None) -> Path:
        """Write a test module (default: the project's module); returns its path."""
        return self.pytester.makepyfile(**{name or self.module: textwrap.dedent(source)})

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest("-p", "no:cacheprovider", *args)

    def record(self, *args: str, ret: int = 0) -> pytest.RunResult:
        """Run with --vram-update and check the run ended with ``ret``."""
        result = self.run("--vram-update", *args)
        assert result.ret == ret, output(result)
        return result

    def record_then_check(
        self, source: str, *args: str
    ) -> tuple[pytest.RunResult, pytest.RunResult]:
        """Write ``source``, record its baselines, then rerun it the ordinary way."""
        self.write(source)
        recorded = self.record(*args)
        return recorded, self.run(*args)

    # -- baseline files ---------------------------------------------------------------------

    def baseline_path(self, module: str | None = None, folder: str = "baselines") -> Path:
        return self.path / folder / "host-cpu" / f"{module or self.module}.json"

    def baseline(self, module: str | None = None, folder: str = "baselines") -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.baseline_path(module, folder).read_text("utf-8"))
        return doc

    def entry(self, test: str, label: str = LABEL) -> dict[str, Any]:
        entry: dict[str, Any] = self.baseline()["entries"][test][label]
        return entry

    def edit_entry(
        self,
        test: str,
        label: str = LABEL,
        *,
        peak_factor: float = 1.0,
        versions: dict[str, str] | None = None,
    ) -> int:
        """Scale the stored peak of one case (and patch its versions); returns the new peak."""
        path = self.baseline_path()
        doc = json.loads(path.read_text("utf-8"))
        entry = doc["entries"][test][label]
        entry["peak_bytes"] = int(entry["peak_bytes"] * peak_factor)
        entry["versions"].update(versions or {})
        path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n", encoding="utf-8")
        return int(entry["peak_bytes"])


@pytest.fixture
def vram_project(pytester: pytest.Pytester) -> VramProject:
    return VramProject(pytester)


# -- tests that need a real GPU run only under --gpu ------------------------------------------
#
# ``@pytest.mark.gpu`` tests measure through the plugin's worker (``gpu_case``), as a session
# does. ``@pytest.mark.gpu(inprocess=True)`` marks the ones that touch CUDA in the pytest process
# itself: that leaves a CUDA context and cached blocks here for the rest of the session, and
# where NVML falls back to the whole device's numbers (a container's PID namespace) later cases
# would count them, so under --gpu they run after all others.


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gpu(inprocess=False): needs a visible GPU; runs only under --gpu. inprocess=True: "
        "touches CUDA in the pytest process, so it runs after all other tests",
    )


def _inprocess(item: pytest.Item) -> bool:
    mark = item.get_closest_marker("gpu")
    return mark is not None and bool(mark.kwargs.get("inprocess", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from pytest_vram.plugin import SESSION

    if config.stash[SESSION].settings.gpu:
        items.sort(key=_inprocess)  # stable: the others keep their order
        return
    skip = pytest.mark.skip(reason="needs a GPU: run with --gpu")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _torch_extensions_under_the_real_home() -> Iterator[None]:
    """pytester points HOME at each test's directory, and torch JIT-builds extensions under
    HOME's cache: a pytester run that starts DeepSpeed (ZeRO cases, ranks), or the worker
    server started inside one, would rebuild DeepSpeed's ops (about 50 s) instead of loading
    those ``pytest-vram build-ops`` built. Exported for the session: the directory torch picks
    under the real HOME."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        yield
        return
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    # torch's own rule for the folder it adds when the variable is unset.
    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "TORCH_EXTENSIONS_DIR",
            os.path.join(get_default_build_root(), f"{python}_{accelerator}"),
        )
        yield


@pytest.fixture(autouse=True, scope="session")
def _share_the_cores_among_xdist_workers() -> None:
    """Steps run in this process (``run_step``, ``pytest_vram.measure``) take this worker's share
    of the cores, as the plugin gives each case child: torch's default, a spinning thread per
    core in every xdist worker, made them several times slower under ``-n``."""
    from pytest_vram.processes import share_cores

    share_cores(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


@pytest.fixture(autouse=True)
def _release_cuda_cache() -> Iterator[None]:
    """After a test that used CUDA here, hand its cached blocks back to the driver."""
    yield
    torch = sys.modules.get("torch")  # not imported: nothing to release, and no import for it
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture
def gpu_case(request: pytest.FixtureRequest) -> Callable[..., MemoryResult]:
    """``gpu_case(spec, **meter_options)``: the case measured by the cuda meter in a fork of the
    plugin's worker, as a session measures it; a case that fails fails the test."""
    from pytest_vram.plugin import SESSION
    from pytest_vram.worker import CaseFailure, Job

    session = request.config.stash[SESSION]

    def run(spec: StepSpec, **meter_options: Any) -> MemoryResult:
        __tracebackhide__ = True
        job = Job("cuda", spec=spec, meter_options=meter_options)
        out = session.worker.run(job, session.settings.timeout_s)
        if isinstance(out, CaseFailure):
            pytest.fail(out.long_repr(), pytrace=False)
        return out

    return run


# -- NVML and CUDA without a GPU: stand-ins for the meter's logic in CPU tests ---------------

FAKE_UUID = "GPU-8a1b2c3d-0000-1111-2222-333344445555"


class FakeNvml(types.ModuleType):
    """pynvml for machines without an NVIDIA driver: one GPU (``FAKE_UUID``) with this process
    on it. ``fail[name] = exc`` makes the function ``name`` raise ``exc`` from then on."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return f"NVML error {self.value}"

    # As in nvidia-ml-py: not an NVMLError.
    class NVMLLibraryMismatchError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.fail: dict[str, BaseException] = {}
        self.calls: dict[str, int] = {}
        self.name = "NVIDIA H100 80GB HBM3"
        self.total_bytes = 80 * GIB
        self.used_bytes = 300 * 2**20
        self.listed = True  # is this process in the device's process list
        self.mig_current = self.NVML_DEVICE_MIG_DISABLE
        self.mig_device = False  # is the handle a MIG slice's

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail[name]

    def nvmlInit(self) -> None:
        self._call("nvmlInit")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self._call("nvmlDeviceGetHandleByUUID")
        if uuid != FAKE_UUID:
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return "handle-0"

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call("nvmlDeviceGetHandleByIndex")
        if index != 0:
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return "handle-0"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        self._call("nvmlDeviceGetUUID")
        return FAKE_UUID

    def nvmlDeviceGetName(self, handle: str) -> str:
        self._call("nvmlDeviceGetName")
        return self.name

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[types.SimpleNamespace]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        if not self.listed:
            return []
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.used_bytes)]

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> types.SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        return types.SimpleNamespace(total=self.total_bytes, used=self.used_bytes + GIB)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        return 12040

    def nvmlDeviceIsMigDeviceHandle(self, handle: str) -> int:
        self._call("nvmlDeviceIsMigDeviceHandle")
        return int(self.mig_device)

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:
        self._call("nvmlDeviceGetMigMode")
        return [self.mig_current, self.mig_current]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """``import pynvml`` gives a ``FakeNvml``, initialised afresh."""
    from pytest_vram.meters import nvml

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(nvml, "_initialised_pid", None)  # a real NVML may have been started
    return fake


class FakeCuda:
    """What the cuda meter asks of torch.cuda, for entering it without a GPU: one device whose
    peak counters the test sets; ``calls`` lists the calls that change the allocator's state."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.props = types.SimpleNamespace(
            name="NVIDIA GeForce RTX 4090",
            total_memory=24 * GIB,
            uuid=FAKE_UUID.removeprefix("GPU-"),  # torch's UUIDs are bare
            major=8,
            minor=9,
        )
        self.allocated_bytes = 100 * 2**20
        self.reserved_bytes = 128 * 2**20


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    import torch

    fake = FakeCuda()

    def recorder(name: str) -> Callable[..., None]:
        return lambda *args: fake.calls.append(name)

    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, recorder(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: fake.props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: fake.allocated_bytes)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: fake.reserved_bytes)
    return fake


def estimate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``pytest-vram estimate ARGS --json`` in this process: its JSON object (status 0)."""
    from pytest_vram.cli import main

    assert main(["estimate", *args, "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data
