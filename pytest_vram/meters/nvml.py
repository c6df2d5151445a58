"""NVML: the device memory the driver charges to this process, as nvidia-smi shows it.

pynvml (the nvidia-ml-py package) is imported only inside functions, so a CPU-only install
without it can still import the cuda meter; ``nvml_unavailable()`` says why NVML cannot be used.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, final

from pytest_vram import cuda_visible
from pytest_vram.cuda_visible import UUID_PREFIXES
from pytest_vram.errors import extra, missing_library

__all__ = [
    "DeviceInfo",
    "NvmlSampler",
    "cuda_version_string",
    "device_info",
    "driver_versions",
    "error_text",
    "mig_mode",
    "nvml_index",
    "nvml_unavailable",
]

_init_lock = threading.Lock()
_initialised_pid: int | None = None


def _pynvml() -> Any:
    """pynvml, initialised. Raises ImportError, pynvml.NVMLError when NVML cannot start, or
    whatever a mismatched or broken install raises (pynvml's NVMLLibraryMismatchError is not an
    NVMLError; a damaged library gives OSError or AttributeError).

    NVML stays initialised for the life of the process: nvmlInit enumerates every device, and
    the meter runs in a short-lived worker child. A forked child initialises its own.
    """
    global _initialised_pid
    import pynvml

    with _init_lock:
        if _initialised_pid != os.getpid():
            pynvml.nvmlInit()
            _initialised_pid = os.getpid()
    return pynvml


def error_text(exc: BaseException) -> str:
    """An NVML failure in one line; the type says what the message often does not."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def nvml_unavailable() -> str | None:
    """None when NVML can be used here, else why not, in one line."""
    try:
        import pynvml
    except ImportError:
        # pytest-vram's gpu extra is this one requirement; pip knows pynvml as nvidia-ml-py.
        return missing_library("nvidia-ml-py", extra("gpu"))
    except Exception as exc:  # a broken install fails while importing, not only later
        return f"nvidia-ml-py could not be imported: {error_text(exc)}"
    nvml_error = getattr(pynvml, "NVMLError", None)
    try:
        _pynvml()
    except Exception as exc:  # NVML is optional: any failure to start is a reason, not a crash
        if isinstance(nvml_error, type) and isinstance(exc, nvml_error):
            return f"NVML could not be initialised: {exc} (no NVIDIA driver?)"
        return f"NVML could not be initialised: {error_text(exc)}"
    return None


def _text(value: str | bytes) -> str:
    # nvidia-ml-py before 11.515 returned bytes
    return value.decode() if isinstance(value, bytes) else value


def cuda_version_string(code: int) -> str:
    """NVML's and CUDA's integer version, 12040 -> ``12.4``."""
    if code <= 0:
        raise ValueError(f"CUDA version code {code!r} is not positive")
    return f"{code // 1000}.{code % 1000 // 10}"


def nvml_index(torch_index: int, visible: str | None) -> int | str:
    """The NVML device behind torch's device ``torch_index``: an NVML index, or a UUID to look up.

    ``visible`` is CUDA_VISIBLE_DEVICES, read by CUDA's rules (``cuda_visible.read``): its
    entries are CUDA indices or GPU-/MIG- UUIDs (or unique prefixes of them). A CUDA index is
    NVML's index when CUDA_DEVICE_ORDER is PCI_BUS_ID or the GPUs are all alike; CUDA's default
    order puts the fastest first, so the cuda meter looks devices up by the UUID torch reports
    instead, when torch has one.
    """
    if torch_index < 0:
        raise ValueError(f"torch device index {torch_index} is negative")
    devices = cuda_visible.read(visible).devices
    if devices is None:  # unset: CUDA numbers every device as NVML does
        return torch_index
    if torch_index >= len(devices):
        raise ValueError(
            f"torch device {torch_index} is not visible: {cuda_visible.VARIABLE}={visible!r} "
            f"makes {len(devices)} device(s) visible"
        )
    device = devices[torch_index]
    return device if device.startswith(UUID_PREFIXES) else int(device)


def _target(torch_index: int, uuid: str | None) -> int | str:
    return uuid if uuid else nvml_index(torch_index, os.environ.get(cuda_visible.VARIABLE))


def _handle(nvml: Any, target: int | str) -> Any:
    """The NVML handle of an NVML index, a full UUID, a bare one (torch's) or a UUID prefix."""
    if isinstance(target, int):
        return nvml.nvmlDeviceGetHandleByIndex(target)
    full = target.startswith(UUID_PREFIXES)
    candidates = [target] if full else [p + target for p in UUID_PREFIXES]
    for uuid in candidates:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError:
            pass
    # CUDA_VISIBLE_DEVICES also takes a unique prefix of a GPU's UUID
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    matches = [h for h in handles if _text(nvml.nvmlDeviceGetUUID(h)).startswith(tuple(candidates))]
    if len(matches) != 1:
        # A MIG slice or a vGPU can carry a UUID that NVML does not list among the GPUs
        raise LookupError(f"{len(matches)} NVML devices have a UUID starting with {target!r}")
    return matches[0]


def driver_versions() -> tuple[str, str]:
    """The NVIDIA driver version (``550.54.15``) and the CUDA version it supports (``12.4``)."""
    nvml = _pynvml()
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    return driver, cuda_version_string(nvml.nvmlSystemGetCudaDriverVersion())


def mig_mode(index: int, uuid: str | None = None) -> str:
    """``on`` or ``off``: whether torch's device ``index`` is a MIG slice or a GPU in MIG mode.

    A GPU that cannot be partitioned answers Not Supported, which is ``off`` too.
    """
    nvml = _pynvml()
    handle = _handle(nvml, _target(index, uuid))
    if nvml.nvmlDeviceIsMigDeviceHandle(handle):
        return "on"
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) == nvml.NVML_ERROR_NOT_SUPPORTED:
            return "off"
        raise
    return "on" if current == nvml.NVML_DEVICE_MIG_ENABLE else "off"


@final
@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str  # "NVIDIA H100 80GB HBM3"
    total_bytes: int
    uuid: str  # "GPU-..." or "MIG-..."
    driver_version: str
    cuda_driver_version: str  # "12.4"


def device_info(index: int, uuid: str | None = None) -> DeviceInfo:
    """What NVML says about torch's device ``index``; ``uuid`` (torch's, if known) finds it
    without relying on CUDA and NVML numbering devices alike."""
    nvml = _pynvml()
    handle = _handle(nvml, _target(index, uuid))
    driver, cuda_driver = driver_versions()
    return DeviceInfo(
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        driver_version=driver,
        cuda_driver_version=cuda_driver,
    )


@final
class NvmlSampler:
    """Samples one device's memory used by this process on a daemon thread.

    ``peak_bytes`` is the largest reading since entering or the last ``reset()``. Enter it once
    the process has a CUDA context, or NVML does not list the process yet. When the driver does
    not report per-process memory (MIG, Windows WDDM) or does not list our pid (a container's
    PID namespace), it reads the whole device's used memory: ``per_process`` is then False and
    ``note`` says why. ``read`` replaces NVML (tests; it returns bytes, or None for no reading).
    """

    def __init__(
        self,
        device_index: int = 0,
        *,
        uuid: str | None = None,
        pid: int | None = None,
        interval_s: float = 0.005,
        read: Callable[[], int | None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.device_index = device_index
        self.uuid = uuid
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.per_process = True
        self.note: str | None = None
        self.peak_bytes = 0
        self.last_bytes: int | None = None
        self._given_read = read
        self._read: Callable[[], int | None] | None = None
        self._lock = threading.Lock()  # one reading at a time, and peak updates with it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> NvmlSampler:
        if self._thread is not None:
            raise RuntimeError("this NvmlSampler is already running")
        self._read = self._given_read or self._nvml_reader()
        self._stop.clear()
        self._error = None
        self.reset()  # a first reading here: a reader that cannot read fails on entering
        self._thread = threading.Thread(target=self._run, name="pytest-vram-nvml", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._read = None
        error, self._error = self._error, None
        if error is None:
            return
        if exc is None:
            raise error
        # The body's own error (an OOM, say) is the one to report: the worker classifies by it.
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"NVML sampling also failed: {error!r}")

    def reset(self) -> None:
        """Start a new window; its peak begins at a reading taken now."""
        self._raise_pending()
        with self._lock:
            self.peak_bytes = 0
            self.last_bytes = None
            self._take_locked()

    def sample(self) -> int | None:
        """Read now (a step's end must not wait for the thread's next tick); None: no reading."""
        self._raise_pending()
        with self._lock:
            return self._take_locked()

    def _raise_pending(self) -> None:
        if self._read is None:
            raise RuntimeError("NvmlSampler reads only inside its with block")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _take_locked(self) -> int | None:
        assert self._read is not None
        value = self._read()
        if value is not None:
            self.last_bytes = value
            self.peak_bytes = max(self.peak_bytes, value)
        return value

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                with self._lock:
                    self._take_locked()
        except BaseException as exc:  # handed to the caller's thread by reset, sample or exit
            self._error = exc

    def _nvml_reader(self) -> Callable[[], int | None]:
        nvml = _pynvml()
        handle = _handle(nvml, _target(self.device_index, self.uuid))
        pid = self.pid

        def own_bytes() -> int | None:
            used = [
                p.usedGpuMemory
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == pid
            ]
            if not used or None in used:
                return None
            return sum(int(u) for u in used)  # a process may hold several contexts

        def device_bytes() -> int:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)

        try:
            mine = [p for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid]
        except nvml.NVMLError as exc:
            why = f"NVML cannot list the device's processes ({exc})"
        else:
            if mine and all(p.usedGpuMemory is not None for p in mine):
                self.per_process = True
                self.note = None
                return own_bytes
            why = (
                "the driver does not report per-process memory"
                if mine
                else f"NVML does not list process {pid} (a container's PID namespace?)"
            )
        self.per_process = False
        self.note = f"{why}: NVML numbers are the whole device's used memory"
        return device_bytes
