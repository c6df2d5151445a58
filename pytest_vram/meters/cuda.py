"""The GPU meter: torch's allocator counters and NVML around each step.

Each step records three peaks: allocated (tensors), reserved (allocated plus the caching
allocator's cache) and NVML (the whole process as nvidia-smi shows it: reserved plus the CUDA
context and libraries' workspaces). ``peak_source`` picks the one budgets check. The breakdown's
model state (params, grads, optimizer) is read from the role tensors at the end of the step, and
the rest of the chosen peak is activations and temporaries. With ``snapshot_dir`` the meter also
writes a memory snapshot for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Final, final

import torch

from pytest_vram.meters.base import PEAK_SOURCES, Breakdown, Roles, StepMeasure
from pytest_vram.meters.nvml import (
    NvmlSampler,
    device_info,
    driver_versions,
    nvml_unavailable,
)

__all__ = [
    "PEAK_SOURCES",
    "CudaMeter",
    "cudnn_version_string",
    "default_device_index",
    "fingerprint_from_name",
    "snapshot_filename",
    "storage_bytes",
]

# Alloc/free events a snapshot keeps (a ring buffer); each is a few KB with its stack.
SNAPSHOT_MAX_ENTRIES: Final = 100_000


def fingerprint_from_name(name: str, total_bytes: int) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; the size is added when the name lacks it."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = re.sub(r"^nvidia-", "", words) or "gpu"
    if not re.search(r"\d+gb", words):
        words += f"-{round(total_bytes / 2**30)}gb"
    return f"nvidia-{words}"


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


def snapshot_filename(label: str) -> str:
    """A file name for a case's snapshot: the label made safe, plus a unique suffix.

    ``tiny-llama lora adamw bf16 b1 s32`` -> ``tiny-llama-lora-adamw-bf16-b1-s32-1a2b3c4d.pickle``
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:80].rstrip("-.") or "snapshot"
    return f"{stem}-{uuid.uuid4().hex[:8]}.pickle"


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
class CudaMeter:
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
        self.device_index = index
        self.device = f"cuda:{index}"
        self._host: dict[int, int] = {}  # offloaded storages on the host: data_ptr -> bytes
        self.snapshot_label: str | None = None  # names the snapshot file; set before entering
        self.snapshot_path: str | None = None  # the snapshot written by the last exit
        self.notes: list[str] = []  # how NVML behaved, for MemoryResult.notes
        self._sampler: NvmlSampler | None = None
        self._stack: contextlib.ExitStack | None = None

    def fingerprint(self) -> str:
        # NVML and torch both report the driver's device name; only the rounded size, added
        # when the name lacks one, could tell them apart.
        if nvml_unavailable() is None:
            with contextlib.suppress(LookupError):
                info = device_info(self.device_index, uuid=_torch_uuid(self.device_index))
                return fingerprint_from_name(info.name, info.total_bytes)
        props = torch.cuda.get_device_properties(self.device_index)
        return fingerprint_from_name(props.name, props.total_memory)

    def versions(self) -> dict[str, str]:
        """The driver and CUDA libraries a GPU result depends on, as far as they are known."""
        found: dict[str, str] = {}
        if nvml_unavailable() is None:
            found["nvidia-driver"], found["cuda-driver"] = driver_versions()
        if torch.version.cuda:
            found["torch-cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]  # None: no cuDNN
        if cudnn:
            found["cudnn"] = cudnn_version_string(cudnn)
        return found

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
        self.notes = []
        with contextlib.ExitStack() as stack:
            if self.sample_nvml and reason is None:
                sampler = NvmlSampler(self.device_index, uuid=_torch_uuid(self.device_index))
                self._sampler = stack.enter_context(sampler)
                stack.callback(setattr, self, "_sampler", None)
                if sampler.note:
                    self.notes.append(sampler.note)
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

    def _dump_snapshot(self, directory: str) -> None:
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, snapshot_filename(self.snapshot_label or ""))
            torch.cuda.memory._dump_snapshot(path)  # type: ignore[no-untyped-call]
            self.snapshot_path = path
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    def step_begin(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if self._sampler is not None:
            self._sampler.reset()

    def step_end(self, roles: Roles) -> StepMeasure:
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        nvml: int | None = None
        if self._sampler is not None:
            # The caching allocator seldom hands memory back within a step, so the process's
            # NVML usage mostly only grows and a reading now catches what a tick missed.
            self._sampler.sample()
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
