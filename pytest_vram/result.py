"""The result every meter returns, and what it is made of.

Nothing here imports torch: results travel from the worker child to the pytest process as JSON
and are read there without it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar, final

from pytest_vram.calibration import Prediction
from pytest_vram.errors import SpecError
from pytest_vram.spec import StepSpec
from pytest_vram.timeline import Timeline

__all__ = ["GIB", "PEAK_SOURCES", "SCHEMA", "Breakdown", "MemoryResult", "StepMeasure", "gib"]

T = TypeVar("T")
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
    snapshot_path: str | None = None  # memory snapshot (memory_viz), when one was written
    trainable_params: int = 0
    total_params: int = 0
    # Parameter storage by dtype ("bfloat16", "uint8" for bitsandbytes' packed 4-bit, ...)
    param_dtype_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # What else moves the numbers on a GPU (allocator and cuBLAS settings, NCCL variables,
    # driver, MIG mode, whether NVML saw the process): drift messages name what changed.
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the libraries behaved, e.g. "paging fell back on CPU"
    # Device bytes over the steps (for the HTML report); not kept in baselines.
    timeline: Timeline | None = None
    # The fake meter's prediction of this case (with --gpu or --vram-calibrate).
    prediction: Prediction | None = None

    @property
    def peak_gib(self) -> float:
        return gib(self.peak_bytes)

    def device_counts(self) -> list[tuple[str, int]]:
        """The allocated, reserved and nvml bytes that are known, by name: measured on the GPU,
        "predicted ..." elsewhere (the CUDA caching allocator simulated over the trace)."""
        prefix = "predicted " if self.meter != "cuda" else ""
        counts = (
            ("allocated", self.allocated_bytes),
            ("reserved", self.reserved_bytes),
            ("nvml", self.nvml_bytes),
        )
        return [(prefix + name, nbytes) for name, nbytes in counts if nbytes is not None]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict() if self.spec else None
        data["step_peak_bytes"] = list(self.step_peak_bytes)
        data["versions"] = dict(self.versions)
        data["environment"] = dict(self.environment)
        data["param_dtype_bytes"] = dict(self.param_dtype_bytes)
        data["notes"] = list(self.notes)
        data["ranks"] = [r.to_dict() for r in self.ranks]
        data["timeline"] = self.timeline.to_dict() if self.timeline else None
        # Absent, not null, when there is none: baseline entries from before it stay unchanged.
        if self.prediction is None:
            del data["prediction"]
        else:
            data["prediction"] = self.prediction.to_dict()
        data["schema"] = SCHEMA
        return data

    def baseline_dict(self) -> dict[str, Any]:
        """``to_dict`` without what belongs to one run only: the timelines, and the snapshot's
        path (a temporary file, or one kept in the report's folder)."""
        data = self.to_dict()
        for where in (data, *data["ranks"]):
            where.pop("timeline", None)
            where["snapshot_path"] = None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryResult:
        """A result from its ``to_dict`` form, every key checked: a ValueError names the key,
        the value and what would be accepted (baseline files are edited by hand and merged)."""
        return _from_dict(data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MemoryResult:
        return cls.from_dict(json.loads(text))


# -- reading a result back: every key of to_dict, checked -------------------------------------

_REQUIRED: Final = ("label", "meter", "device", "peak_bytes", "step_peak_bytes", "breakdown")
_COUNTS: Final = ("peak_bytes", "host_offload_bytes", "trainable_params", "total_params")
_OPTIONAL_COUNTS: Final = ("reserved_bytes", "allocated_bytes", "nvml_bytes")
_KEYS: Final = frozenset(f.name for f in dataclasses.fields(MemoryResult)) | {"schema"}
_TERMS: Final = tuple(f.name for f in dataclasses.fields(Breakdown))
_COUNT: Final = "an integer >= 0 (a JSON number, no quotes)"


def _bad(key: str, value: object, accepted: str) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return ValueError(f"{key}={shown} ({article} {kind}) is not accepted; expected {accepted}")


def _count(key: str, value: object) -> int:
    # bool is an int to Python, never to a baseline
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(key, value, _COUNT)
    return value


def _text(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(key, value, "a string")
    return value


def _object(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(key, value, "an object")
    return value


def _items(key: str, value: object) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _bad(key, value, "a list")
    return list(value)


def _text_map(key: str, value: object) -> dict[str, str]:
    return {k: _text(f"{key}[{k!r}]", v) for k, v in _object(key, value).items()}


def _part(where: str, value: object, read: Callable[[Any], T]) -> T | None:
    """An optional part read by its own ``from_dict``, its error prefixed with ``where``."""
    if value is None:
        return None
    try:
        return read(value)
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def _from_dict(data: Mapping[str, Any], where: str) -> MemoryResult:
    """``where``: the key path of a rank's result (``ranks[1].``), for the messages."""
    if not isinstance(data, Mapping):
        raise _bad(where.rstrip(".") or "result", data, "an object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"missing key {where}{missing[0]}; a result needs {', '.join(_REQUIRED)}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ValueError(f"unknown key {where}{unknown[0]}; known keys: {', '.join(sorted(_KEYS))}")
    schema = data.get("schema", SCHEMA)  # results from before the key existed are schema 1
    if type(schema) is not int or schema != SCHEMA:
        raise ValueError(
            f"{where}schema: result schema {schema!r} is not {SCHEMA}; expected {SCHEMA}, the "
            "only result schema this pytest-vram reads (written by another version?)"
        )
    breakdown = _object(f"{where}breakdown", data["breakdown"])
    for term in breakdown:
        if term not in _TERMS:
            raise ValueError(f"unknown key {where}breakdown.{term}; terms: {', '.join(_TERMS)}")
    spec = data.get("spec")
    if spec is not None:
        try:
            parsed_spec: StepSpec | None = StepSpec.from_dict(_object(f"{where}spec", spec))
        except SpecError as exc:
            raise ValueError(f"{where}spec: {exc}") from None
    else:
        parsed_spec = None
    source = _text(f"{where}peak_source", data.get("peak_source", "storage"))
    if source not in ("storage", *PEAK_SOURCES):
        raise _bad(f"{where}peak_source", source, ", ".join(("storage", *PEAK_SOURCES)))
    zero = data.get("zero_config")
    timeline = _part(where, data.get("timeline"), Timeline.from_dict)
    snapshot = data.get("snapshot_path")
    prediction = _part(where, data.get("prediction"), Prediction.from_dict)
    dtypes = _object(f"{where}param_dtype_bytes", data.get("param_dtype_bytes", {}))
    counts: dict[str, Any] = {k: _count(f"{where}{k}", data[k]) for k in _COUNTS if k in data}
    for k in _OPTIONAL_COUNTS:
        if data.get(k) is not None:
            counts[k] = _count(f"{where}{k}", data[k])
    return MemoryResult(
        label=_text(f"{where}label", data["label"]),
        meter=_text(f"{where}meter", data["meter"]),
        device=_text(f"{where}device", data["device"]),
        step_peak_bytes=tuple(
            _count(f"{where}step_peak_bytes[{i}]", v)
            for i, v in enumerate(_items(f"{where}step_peak_bytes", data["step_peak_bytes"]))
        ),
        breakdown=Breakdown(
            **{t: _count(f"{where}breakdown.{t}", v) for t, v in breakdown.items()}
        ),
        spec=parsed_spec,
        peak_source=source,
        zero_config=None if zero is None else _object(f"{where}zero_config", zero),
        snapshot_path=None if snapshot is None else _text(f"{where}snapshot_path", snapshot),
        param_dtype_bytes={
            k: _count(f"{where}param_dtype_bytes[{k!r}]", v) for k, v in dtypes.items()
        },
        versions=_text_map(f"{where}versions", data.get("versions", {})),
        environment=_text_map(f"{where}environment", data.get("environment", {})),
        notes=tuple(
            _text(f"{where}notes[{i}]", n)
            for i, n in enumerate(_items(f"{where}notes", data.get("notes", ())))
        ),
        ranks=tuple(
            _from_dict(r, f"{where}ranks[{i}].")
            for i, r in enumerate(_items(f"{where}ranks", data.get("ranks", ())))
        ),
        timeline=timeline,
        prediction=prediction,
        **counts,
    )
