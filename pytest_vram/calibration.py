"""How good the fake meter's prediction was: the prediction kept beside the measurement.

With ``--gpu`` (or ``--vram-calibrate``) every case of a spec is also traced on the fake meter,
in its own child of the same worker server, and its numbers ride in the measured result
(``MemoryResult.prediction``, kept in the baseline entry too). The error is read against the
number the budget checks: tensor storage on the host meter (where the fake meter should agree
to the byte, and a ZeRO case shows the simulation against the real engine), ``allocated``,
``reserved`` or ``nvml`` on a GPU (the caching allocator simulated over the trace, plus what
``device_profile`` says the GPU holds besides: cuBLAS workspaces, the CUDA context, NCCL).
Every GPU case also measures what NVML counts beyond ``reserved``; the summary sets it beside
the profile's figure, which is how ``--vram-cuda-context-mib`` is calibrated. Torch-free: it
runs in the pytest process.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, final

from pytest_vram.units import format_pair

__all__ = [
    "Error",
    "Prediction",
    "comparison",
    "error_of",
    "outside_allocator_lines",
    "row_cases",
    "summary_lines",
]

# The measured number a predicted one is compared with, by the peak source the budget checks.
_PREDICTED_FIELD: Final = {
    "storage": "storage_bytes",
    "allocated": "allocated_bytes",
    "reserved": "reserved_bytes",
    "nvml": "nvml_bytes",
}
_COUNTS: Final = tuple(_PREDICTED_FIELD.values())


@final
@dataclasses.dataclass(frozen=True)
class Prediction:
    """The fake meter's numbers for a case: its storage peak and the caching allocator's
    allocated and reserved, on a GPU with its device profile's terms and nvml; or why it
    could not trace the case."""

    storage_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    unsupported: str = ""  # why there is no prediction
    nvml_bytes: int | None = None
    device: str = ""  # the device profile's terms (DeviceProfile.describe), on a GPU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Prediction:
        if not isinstance(data, Mapping):
            raise ValueError(f"prediction={data!r} is not an object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown key prediction.{unknown[0]}")
        counts: dict[str, int | None] = {}
        for key in _COUNTS:
            value = data.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"prediction.{key}={value!r} is not an integer >= 0")
            counts[key] = value
        texts: dict[str, str] = {}
        for key in ("unsupported", "device"):
            text = data.get(key, "")
            if not isinstance(text, str):
                raise ValueError(f"prediction.{key}={text!r} is not a string")
            texts[key] = text
        return cls(
            counts["storage_bytes"],
            counts["allocated_bytes"],
            counts["reserved_bytes"],
            unsupported=texts["unsupported"],
            nvml_bytes=counts["nvml_bytes"],
            device=texts["device"],
        )


@final
@dataclasses.dataclass(frozen=True)
class Error:
    """A prediction against the measured number the budget checks."""

    source: str  # "storage", "allocated" or "reserved"
    predicted_bytes: int
    measured_bytes: int

    @property
    def fraction(self) -> float:
        """Signed: below 0 the prediction was short of the measurement."""
        if not self.measured_bytes:
            return 0.0 if not self.predicted_bytes else float("inf")
        return self.predicted_bytes / self.measured_bytes - 1

    def line(self) -> str:
        predicted, measured = format_pair(self.predicted_bytes, self.measured_bytes)
        return (
            f"the fake meter predicted {predicted} {self.source}, "
            f"measured {measured} ({self.fraction:+.1%})"
        )


def error_of(
    prediction: Prediction | None, peak_source: str, measured_bytes: int | None
) -> Error | None:
    """The prediction's error on the number the budget checks; None without one to compare
    (no prediction, or none of that number: nvml of a case without a GPU)."""
    if prediction is None or measured_bytes is None or peak_source not in _PREDICTED_FIELD:
        return None
    predicted = getattr(prediction, _PREDICTED_FIELD[peak_source])
    if predicted is None:
        return None
    return Error(peak_source, predicted, measured_bytes)


def row_cases(rows: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Error | None, str]]:
    """(label, prediction error, why there is none) of each summary row whose result carries
    a prediction (``CaseVerdict.row()``)."""
    for row in rows:
        result = row["result"]
        if result.get("prediction") is None:
            continue
        prediction = Prediction.from_dict(result["prediction"])
        error = error_of(prediction, result["peak_source"], result["peak_bytes"])
        yield row["label"], error, prediction.unsupported


def summary_lines(cases: Iterable[tuple[str, Error | None, str]]) -> Iterator[str]:
    """The error distribution over a run: ``cases`` are (label, error, why there is none)."""
    cases = list(cases)
    errors = [(label, e) for label, e, _ in cases if e is not None]
    missing = [(label, why) for label, e, why in cases if e is None and why]
    if not errors and not missing:
        return
    if errors:
        fractions = [e.fraction for _, e in errors]
        worst_label, worst = max(errors, key=lambda item: abs(item[1].fraction))
        sources = ", ".join(sorted({e.source for _, e in errors}))
        within = sum(abs(f) <= 0.05 for f in fractions)
        yield (
            f"prediction error (fake meter vs measured {sources}): {len(errors)} "
            f"case{'s' * (len(errors) != 1)}, median {statistics.median(fractions):+.1%}, "
            f"{within} within 5%, worst {worst.fraction:+.1%} [{worst_label}]"
        )
    for label, why in missing:
        yield f"  no prediction for [{label}]: {why}"


def outside_allocator_lines(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """What NVML counted beyond ``reserved`` on the GPU cases that measured both (the CUDA
    context with the kernels the step loaded, NCCL's buffers), beside what the device profile
    assumed: the figure to set ``--vram-cuda-context-mib`` from."""
    measured: list[int] = []
    assumed: list[int] = []
    for row in rows:
        result = row["result"]
        nvml, reserved = result.get("nvml_bytes"), result.get("reserved_bytes")
        if result.get("meter") != "cuda" or nvml is None or reserved is None:
            continue
        measured.append(nvml - reserved)
        prediction = result.get("prediction")
        if prediction is not None:
            p = Prediction.from_dict(prediction)
            if p.nvml_bytes is not None and p.reserved_bytes is not None:
                assumed.append(p.nvml_bytes - p.reserved_bytes)
    if not measured:
        return
    mib = 2**20
    line = (
        f"NVML beyond reserved (CUDA context, NCCL): median {statistics.median(measured) / mib:,.0f}"
        f" MiB over {len(measured)} case{'s' * (len(measured) != 1)} "
        f"({min(measured) / mib:,.0f}-{max(measured) / mib:,.0f} MiB)"
    )
    if assumed:
        line += (
            f"; the device profile assumed {statistics.median(assumed) / mib:,.0f} MiB "
            "(--vram-cuda-context-mib and --vram-nccl-mib set its terms)"
        )
    yield line


def comparison(
    prediction: Prediction, measured: Mapping[str, int | None]
) -> list[tuple[str, int, int | None, float | None]]:
    """(number, predicted, measured, signed error) for each number the prediction holds;
    ``measured`` maps "storage", "allocated", "reserved" and "nvml" to what the case
    measured (None where its meter does not count it)."""
    rows: list[tuple[str, int, int | None, float | None]] = []
    for source, field in _PREDICTED_FIELD.items():
        predicted = getattr(prediction, field)
        if predicted is None:
            continue
        value = measured.get(source)
        error = None if value is None else Error(source, predicted, value).fraction
        rows.append((source, predicted, value, error))
    return rows
