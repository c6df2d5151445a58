"""What a meter measures, and the result every meter returns.

Nothing here imports torch: results travel from the worker child to the pytest process as JSON
and are read there without it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from pytest_vram.spec import StepSpec

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = [
    "GIB",
    "PEAK_SOURCES",
    "Breakdown",
    "MemoryResult",
    "Meter",
    "Roles",
    "StepMeasure",
    "gib",
]

GIB: Final = 2**30
# What the GPU meter's peak_bytes can count: torch's tensors, its caching allocator, or NVML's
# view of the process (what nvidia-smi shows).
PEAK_SOURCES: Final = ("allocated", "reserved", "nvml")
SCHEMA: Final = 1


def gib(nbytes: int | float) -> float:
    return nbytes / GIB


@final
@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Bytes live at the peak, by role. The five terms add up to the peak."""

    param_bytes: int = 0
    buffer_bytes: int = 0  # model state that is not a parameter (rotary tables, ...)
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0  # activations and temporaries: everything else

    @property
    def total_bytes(self) -> int:
        return sum(dataclasses.astuple(self))

    def rows(self) -> Iterable[tuple[str, int]]:
        yield "parameters", self.param_bytes
        yield "buffers", self.buffer_bytes
        yield "gradients", self.grad_bytes
        yield "optimizer state", self.optimizer_bytes
        yield "activations and temporaries", self.activation_bytes


@final
@dataclasses.dataclass(frozen=True)
class StepMeasure:
    peak_bytes: int  # the number budgets check (see MemoryResult.peak_source)
    breakdown: Breakdown
    reserved_bytes: int | None = None
    allocated_bytes: int | None = None
    nvml_bytes: int | None = None  # the process's device memory as nvidia-smi shows it
    host_offload_bytes: int = 0  # state offloaded to host memory, not in peak_bytes


@dataclasses.dataclass
class Roles:
    """The tensors that hold model state at the end of a step, for the breakdown."""

    params: Sequence[torch.Tensor]
    buffers: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    optimizer: Sequence[torch.Tensor]


class Meter(Protocol):
    """Reads memory around a step. Host, fake and cuda meters differ only in how they read it."""

    name: str
    device: str  # torch device the step runs on

    def fingerprint(self) -> str: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def step_begin(self) -> None: ...

    def step_end(self, roles: Roles) -> StepMeasure: ...


@final
@dataclasses.dataclass(frozen=True)
class MemoryResult:
    """Peak memory of one measured case, with its breakdown at the peak."""

    label: str
    meter: str
    device: str  # device fingerprint: baselines are kept per fingerprint
    peak_bytes: int
    step_peak_bytes: tuple[int, ...]
    breakdown: Breakdown
    spec: StepSpec | None = None
    reserved_bytes: int | None = None
    allocated_bytes: int | None = None
    nvml_bytes: int | None = None
    # What peak_bytes counts: "storage" (host/fake: tensor storage bytes), or for the GPU
    # meter "allocated", "reserved" or "nvml".
    peak_source: str = "storage"
    host_offload_bytes: int = 0  # peak bytes of state offloaded to host memory
    ranks: tuple[MemoryResult, ...] = ()  # one result per rank; peak_bytes is their max
    zero_config: Mapping[str, Any] | None = None  # the DeepSpeed config the step ran with
    snapshot_path: str | None = None  # GPU memory snapshot (memory_viz), when one was taken
    trainable_params: int = 0
    total_params: int = 0
    # Parameter storage by dtype ("bfloat16", "uint8" for bitsandbytes' packed 4-bit, ...)
    param_dtype_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # What else moves the numbers on a GPU (allocator and cuBLAS settings, NCCL variables,
    # driver, MIG mode, whether NVML saw the process): drift messages name what changed.
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the libraries behaved, e.g. "paging fell back on CPU"

    @property
    def peak_gib(self) -> float:
        return gib(self.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict() if self.spec else None
        data["step_peak_bytes"] = list(self.step_peak_bytes)
        data["versions"] = dict(self.versions)
        data["environment"] = dict(self.environment)
        data["param_dtype_bytes"] = dict(self.param_dtype_bytes)
        data["notes"] = list(self.notes)
        data["ranks"] = [r.to_dict() for r in self.ranks]
        data["schema"] = SCHEMA
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryResult:
        data = dict(data)
        schema = data.pop("schema", SCHEMA)
        if schema != SCHEMA:
            raise ValueError(f"result schema {schema!r} is not {SCHEMA}")
        spec = data.pop("spec", None)
        return cls(
            spec=StepSpec.from_dict(spec) if spec else None,
            breakdown=Breakdown(**data.pop("breakdown")),
            step_peak_bytes=tuple(data.pop("step_peak_bytes")),
            versions=dict(data.pop("versions", {})),
            environment=dict(data.pop("environment", {})),
            param_dtype_bytes=dict(data.pop("param_dtype_bytes", {})),
            notes=tuple(data.pop("notes", ())),
            ranks=tuple(cls.from_dict(r) for r in data.pop("ranks", ())),
            **data,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MemoryResult:
        return cls.from_dict(json.loads(text))
