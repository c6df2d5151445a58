"""The GPU meter: torch's allocator counters and NVML around each step.

Each step records three peaks: allocated (tensors), reserved (allocated plus the caching
allocator's cache) and NVML (the whole process as nvidia-smi shows it: reserved plus the CUDA
context and libraries' workspaces). ``peak_source`` picks the one budgets check. The breakdown's
model state (params, grads, optimizer) is read from the role tensors at the end of the step, and
the rest of the chosen peak is activations and temporaries. With ``snapshot_dir`` the meter also
writes a memory snapshot for https://pytorch.org/memory_viz, and reads the case's timeline from it.

NVML is optional: unless ``peak_source`` is ``"nvml"``, anything NVML fails at (starting, finding
the device, a reading mid-case, the driver version) becomes one note in ``notes`` and the case
goes on with torch's numbers only.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Final, final

import torch

from pytest_vram.meters.base import DeviceIndexed, HostOffloadTagging, MemorySnapshots, Meter, Roles
from pytest_vram.meters.memory_viz import snapshot_filename, timeline_of_snapshot, write_pickle
from pytest_vram.meters.nvml import (
    NvmlSampler,
    driver_versions,
    error_text,
    mig_mode,
    nvml_unavailable,
)
from pytest_vram.result import PEAK_SOURCES, Breakdown, StepMeasure
from pytest_vram.timeline import Phase, Timeline

__all__ = [
    "PEAK_SOURCES",
    "CudaMeter",
    "cudnn_version_string",
    "default_device_index",
    "env_entries",
    "fingerprint_from_name",
    "snapshot_filename",
    "storage_bytes",
]

# Alloc/free events a snapshot keeps (a ring buffer); each is a few KB with its stack.
SNAPSHOT_MAX_ENTRIES: Final = 100_000

# Variables that change what a step measures: the allocator's rounding and segments, the cuBLAS
# and cuBLASLt workspaces (allocated through the caching allocator), kernels loaded lazily or
# eagerly into the CUDA context (NVML's number), and which GPU an index is. NCCL_* are matched by
# prefix. CUDA_VISIBLE_DEVICES is left out on purpose: the session gives each xdist worker its
# own GPUs through it, so it differs between workers and runs measuring the same kind of device,
# and the device itself is in the fingerprint.
ENV_VARIABLES: Final = (
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUBLASLT_WORKSPACE_SIZE",
    "TORCH_CUBLASLT_UNIFIED_WORKSPACE",
    "CUDA_MODULE_LOADING",
    "CUDA_DEVICE_ORDER",
)


def fingerprint_from_name(name: str, total_bytes: int) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; the size is added when the name lacks it."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = re.sub(r"^nvidia-", "", words) or "gpu"
    if not re.search(r"\d+gb", words):
        words += f"-{round(total_bytes / 2**30)}gb"
    return f"nvidia-{words}"


def env_entries(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that move GPU numbers, as ``env:NAME`` entries, sorted.

    Empty ones are left out with the unset ones: torch and NCCL read an empty value as the default.
    """
    names = sorted(
        name
        for name, value in environ.items()
        if value and (name in ENV_VARIABLES or name.startswith("NCCL_"))
    )
    return {f"env:{name}": environ[name] for name in names}


def storage_bytes(
    tensors: Iterable[torch.Tensor], seen: set[int], device_type: str | None = None
) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen``; only those on
    ``device_type`` when given (offloaded state lives in host memory, not on the device)."""
    total = 0
    for t in tensors:
        if getattr(t, "is_paged", False):  # bitsandbytes managed memory: not in the allocator
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def cudnn_version_string(code: int) -> str:
    """torch.backends.cudnn.version(): 90100 -> ``9.1.0``, 8902 -> ``8.9.2``."""
    if code <= 0:
        raise ValueError(f"cuDNN version code {code!r} is not positive")
    major, rest = divmod(code, 10_000 if code >= 10_000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def default_device_index() -> int:
    """The device of this rank: LOCAL_RANK (set by torchrun and the DeepSpeed launcher), else 0."""
    raw = os.environ.get("LOCAL_RANK", "0")
    if not raw.strip().isdigit():
        raise ValueError(f"LOCAL_RANK={raw!r} is not a device index")
    return int(raw)


def _torch_uuid(index: int) -> str | None:
    # Bare 8-4-4-4-12 hex; torch builds without the attribute (old ROCm) have none.
    found = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(found) if found is not None else None


@final
class CudaMeter(Meter, HostOffloadTagging, MemorySnapshots, DeviceIndexed):
    name = "cuda"

    def __init__(
        self,
        peak_source: str = "reserved",
        snapshot_dir: str | None = None,
        device_index: int | None = None,
        sample_nvml: bool = True,
    ) -> None:
        if peak_source not in PEAK_SOURCES:
            raise ValueError(f"peak_source {peak_source!r} is not one of {', '.join(PEAK_SOURCES)}")
        if peak_source == "nvml" and not sample_nvml:
            raise ValueError("peak_source 'nvml' needs sample_nvml=True")
        index = default_device_index() if device_index is None else device_index
        if index < 0:
            raise ValueError(f"device_index {index} is negative")
        self.peak_source = peak_source
        self.snapshot_dir = snapshot_dir
        self.sample_nvml = sample_nvml
        self.use_device(index)
        self._host: dict[int, int] = {}  # offloaded storages on the host: data_ptr -> bytes
        self.snapshot_label: str | None = None  # names the snapshot file; set before entering
        self.snapshot_path: str | None = None  # the snapshot written by the last exit
        self.notes: list[str] = []  # how NVML behaved, for MemoryResult.notes
        # How NVML saw this process at the last entering: "per-process", "device-wide" (the
        # driver or a PID namespace hid it), "unavailable" or "off" (sample_nvml=False); None
        # before the first entering. A failure later in the case is a note, not a change here.
        self.nvml_scope: str | None = None
        self._sampler: NvmlSampler | None = None
        self._stack: contextlib.ExitStack | None = None
        self._first_step = False  # set by entering: the next step_begin is the case's first
        self._phases: list[Phase] = []  # with snapshot_dir: phases on the trace's clock
        self._timeline: Timeline | None = None  # read from the snapshot at exit

    def use_device(self, index: int) -> None:
        self.device_index = index
        self.device = f"cuda:{index}"

    def fingerprint(self) -> str:
        # torch's name and size only, so the fingerprint is the same with and without
        # nvidia-ml-py: NVML's total differs slightly from torch's, and the rounded GiB added to
        # names that lack one could differ with it.
        props = torch.cuda.get_device_properties(self.device_index)
        return fingerprint_from_name(props.name, props.total_memory)

    def _nvml_failed(self, what: str, exc: Exception, consequence: str) -> None:
        """An NVML failure: an error when the NVML peak was asked for, else a note (once)."""
        if self.peak_source == "nvml":
            raise RuntimeError(
                f"peak_source 'nvml' needs NVML, but {what} failed: {error_text(exc)}"
            ) from exc
        note = f"{consequence}: {what} failed ({error_text(exc)})"
        if note not in self.notes:
            self.notes.append(note)

    def _driver_versions(self, found: dict[str, str]) -> None:
        if nvml_unavailable() is not None:
            return  # no NVML here: versions list what is known; entering notes why, if it samples
        try:
            found["nvidia-driver"], found["cuda-driver"] = driver_versions()
        except Exception as exc:
            self._nvml_failed("reading the driver version", exc, "no driver version")

    def versions(self) -> dict[str, str]:
        """The driver and CUDA libraries a GPU result depends on, as far as they are known."""
        found: dict[str, str] = {}
        self._driver_versions(found)
        if torch.version.cuda:
            found["torch-cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]  # None: no cuDNN
        if cudnn:
            found["cudnn"] = cudnn_version_string(cudnn)
        return found

    def environment(self) -> dict[str, str]:
        """What moves this device's numbers besides the case, as far as it is known: the
        variables of ``env_entries``, the driver and CUDA versions, the compute capability, MIG,
        and how NVML saw the process at the last entering. Meant to be read while entered."""
        found = env_entries(os.environ)
        if torch.version.cuda:
            found["cuda-runtime"] = torch.version.cuda
        uuid = None
        if torch.cuda.is_available() and self.device_index < torch.cuda.device_count():
            props = torch.cuda.get_device_properties(self.device_index)
            found["capability"] = f"{props.major}.{props.minor}"
            uuid = _torch_uuid(self.device_index)
        self._driver_versions(found)
        if nvml_unavailable() is None:
            try:
                found["mig"] = mig_mode(self.device_index, uuid=uuid)
            except Exception as exc:
                self._nvml_failed("reading the MIG mode", exc, "no MIG mode")
        if self.nvml_scope is not None:
            found["nvml"] = self.nvml_scope
        return dict(sorted(found.items()))

    def __enter__(self) -> CudaMeter:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the cuda meter needs a visible GPU; torch.cuda.is_available() is False"
            )
        count = torch.cuda.device_count()
        if self.device_index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise RuntimeError(
                f"device_index {self.device_index} is not visible: {count} GPU(s) are "
                f"(CUDA_VISIBLE_DEVICES={visible!r})"
            )
        reason = nvml_unavailable() if self.sample_nvml else None
        if reason is not None and self.peak_source == "nvml":
            raise RuntimeError(f"peak_source 'nvml' needs NVML: {reason}")
        torch.cuda.set_device(self.device_index)  # one device per rank; .cuda() calls land here
        torch.cuda.synchronize()  # creates this process's CUDA context, so NVML lists it
        torch.cuda.empty_cache()
        self.snapshot_path = None
        self._phases, self._timeline = [], None
        self.notes = []
        self._first_step = True
        self.nvml_scope = "unavailable" if self.sample_nvml else "off"
        with contextlib.ExitStack() as stack:
            if self.sample_nvml and reason is None:
                stack.push(self._close_sampler)
                self._start_sampler()
            elif reason is not None:
                self.notes.append(f"no NVML numbers: {reason}")
            if self.snapshot_dir is not None:
                # Python stacks only: symbolising C++ frames can make the dump take minutes.
                torch.cuda.memory._record_memory_history(
                    stacks="python", max_entries=SNAPSHOT_MAX_ENTRIES
                )
                stack.callback(self._dump_snapshot, self.snapshot_dir)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        error = next((e for e in exc if isinstance(e, BaseException)), None)
        if error is None:
            torch.cuda.synchronize()
        if stack is not None:
            tb = error.__traceback__ if error else None
            stack.__exit__(type(error) if error else None, error, tb)

    def _start_sampler(self) -> None:
        sampler = NvmlSampler(self.device_index, uuid=_torch_uuid(self.device_index))
        try:
            sampler.__enter__()  # its thread starts only once a first reading has worked
        except Exception as exc:
            self._nvml_failed("starting NVML sampling", exc, "no NVML numbers")
            return
        self._sampler = sampler
        self.nvml_scope = "per-process" if sampler.per_process else "device-wide"
        if sampler.note:
            self.notes.append(sampler.note)

    def _close_sampler(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return
        try:
            sampler.__exit__(exc_type, exc, tb)
        except Exception as error:  # raised only when the body succeeded
            self._nvml_failed("NVML sampling", error, "NVML numbers may miss the last step")

    def _sampler_failed(self, exc: Exception) -> None:
        """A reading failed mid-case: stop sampling; later steps have no NVML numbers."""
        sampler, self._sampler = self._sampler, None
        assert sampler is not None
        # Stopping re-raises the thread's error when it was the thread that failed, which is
        # this same failure seen from the other side: reported once, below.
        with contextlib.suppress(Exception):
            sampler.__exit__(None, None, None)
        self._nvml_failed("NVML sampling", exc, "no NVML numbers from this step on")

    def _dump_snapshot(self, directory: str) -> None:
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, snapshot_filename(self.snapshot_label or ""))
            snapshot = torch.cuda.memory._snapshot()
            write_pickle(snapshot, path)
            self.snapshot_path = path
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        self._timeline = timeline_of_snapshot(snapshot, self._phases, self.device_index)

    def phase(self, name: str, step: int) -> None:
        if self.snapshot_dir is not None:  # time_us is realtime in microseconds (c10::getTime)
            self._phases.append(Phase(time.time_ns() // 1000, name, step))

    def timeline(self) -> Timeline | None:  # once exited: requested bytes, from the snapshot
        return self._timeline

    def step_begin(self) -> None:
        torch.cuda.synchronize()
        if self._first_step:
            # The blocks cached while the model was built are not what training holds. Later
            # steps keep the cache: what the first step left cached is.
            torch.cuda.empty_cache()
            self._first_step = False
        torch.cuda.reset_peak_memory_stats()
        if self._sampler is not None:
            try:
                self._sampler.reset()
            except Exception as exc:
                self._sampler_failed(exc)

    def step_end(self, roles: Roles) -> StepMeasure:
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        nvml: int | None = None
        if self._sampler is not None:
            # The caching allocator seldom hands memory back within a step, so the process's
            # NVML usage mostly only grows and a reading now catches what a tick missed.
            try:
                self._sampler.sample()
            except Exception as exc:
                self._sampler_failed(exc)
            else:
                nvml = self._sampler.peak_bytes
        if self.peak_source == "allocated":
            peak = allocated
        elif self.peak_source == "reserved":
            peak = reserved
        else:
            assert nvml is not None, "entering checks that NVML is available"
            peak = nvml
        seen: set[int] = set()
        grad = storage_bytes(roles.grads, seen, "cuda")
        opt = storage_bytes(roles.optimizer, seen, "cuda")
        param = storage_bytes(roles.params, seen, "cuda")
        buffer = storage_bytes(roles.buffers, seen, "cuda")
        breakdown = Breakdown(
            param_bytes=param,
            buffer_bytes=buffer,
            grad_bytes=grad,
            optimizer_bytes=opt,
            # The rest of the chosen peak: for "reserved" it includes the allocator's cache
            # (freed blocks kept for reuse), for "nvml" also the CUDA context and workspaces.
            activation_bytes=max(0, peak - param - buffer - grad - opt),
        )
        return StepMeasure(
            peak,
            breakdown,
            reserved_bytes=reserved,
            allocated_bytes=allocated,
            nvml_bytes=nvml,
            host_offload_bytes=sum(self._host.values()),
        )

    def offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        """Offloaded state (DeepSpeed's host copies): counted as host bytes, by storage."""
        for t in tensors:
            if t.device.type == "cpu":
                st = t.untyped_storage()
                self._host[st.data_ptr()] = st.nbytes()

    @contextlib.contextmanager
    def host_scope(self) -> Iterator[None]:
        # On a GPU the allocator only sees device memory: host allocations need no exclusion.
        yield
