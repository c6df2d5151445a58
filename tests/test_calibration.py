"""The calibration loop: each case's fake-meter prediction kept beside its measurement, its
error against the number the budget checks, ``--vram-calibrate`` failing a case beyond it,
and the error distribution in the summary.

No GPU runs here: GPU cases are recorded measurements fed through the same code (``judge``,
the summary); the host meter runs the whole loop for real, where a ZeRO case's prediction is
the simulation's and its measurement the real engine's.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import output
from pytest_vram.calibration import Error, Prediction, error_of, summary_lines
from pytest_vram.report import Summary
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.units import format_pair
from pytest_vram.verdict import Budget, judge

MIB = 2**20


def gpu_result(reserved_mib: float, predicted_mib: float, source: str = "reserved") -> MemoryResult:
    """A GPU case as the cuda meter reports it, with the fake meter's prediction (recorded)."""
    measured = int(reserved_mib * MIB)
    return MemoryResult(
        label="qwen2-0.5b lora adamw bf16 b4 s512",
        meter="cuda",
        device="nvidia-a100-sxm4-80gb",
        peak_bytes=measured,
        step_peak_bytes=(measured,),
        breakdown=Breakdown(activation_bytes=measured),
        spec=StepSpec(model="qwen2-0.5b", method="lora", batch=4, seq=512),
        peak_source=source,
        reserved_bytes=measured,
        allocated_bytes=measured - 3 * MIB,
        prediction=Prediction(
            storage_bytes=int(predicted_mib * MIB) - 4 * MIB,
            allocated_bytes=int(predicted_mib * MIB) - 3 * MIB,
            reserved_bytes=int(predicted_mib * MIB),
        ),
    )


def _judge(result: MemoryResult, calibrate: float | None) -> tuple[tuple[str, ...], list[str]]:
    verdict = judge(
        "test_x.py::test_x",
        result,
        Budget(None, 0.05),
        result,
        strict=False,
        update=False,
        record_hint="pytest-vram refresh test_x.py::test_x",
        calibrate=calibrate,
    )
    return verdict.statuses, list(verdict.reasons)


@pytest.mark.parametrize(
    ("measured", "predicted", "calibrate", "failed"),
    [
        (1000, 1080, 0.1, False),
        (1000, 1120, 0.1, True),
        (1000, 850, 0.1, True),
        (1000, 850, None, False),
    ],
)
def test_a_recorded_gpu_case_fails_only_beyond_the_calibration_tolerance(
    measured: float, predicted: float, calibrate: float | None, failed: bool
) -> None:
    statuses, reasons = _judge(gpu_result(measured, predicted), calibrate)
    assert ("prediction-off" in statuses) == failed
    if failed:
        shown = format_pair(int(predicted * MIB), int(measured * MIB))
        assert reasons == [
            f"the fake meter predicted {shown[0]} reserved, measured {shown[1]} "
            f"({predicted / measured - 1:+.1%}), beyond --vram-calibrate 10.0% "
            "[qwen2-0.5b lora adamw bf16 b4 s512]"
        ]
    else:
        assert reasons == []


def test_the_error_is_read_on_the_number_the_budget_checks() -> None:
    result = gpu_result(1000, 1100)
    prediction = result.prediction
    assert error_of(prediction, "reserved", 1000 * MIB) == Error("reserved", 1100 * MIB, 1000 * MIB)
    allocated = error_of(prediction, "allocated", 997 * MIB)
    assert allocated is not None and allocated.predicted_bytes == 1097 * MIB
    assert error_of(prediction, "storage", 1000 * MIB) == Error("storage", 1096 * MIB, 1000 * MIB)
    # A prediction without the device profile's nvml (traced for a host case) has no error
    # on it; tests/test_device_profile.py reads one that has.
    assert error_of(prediction, "nvml", 1000 * MIB) is None
    assert error_of(None, "reserved", 1000 * MIB) is None
    assert error_of(Prediction(unsupported="why"), "reserved", 1) is None


def test_the_summary_prints_the_error_distribution_of_recorded_gpu_cases() -> None:
    results = [gpu_result(1000, p) for p in (990, 1010, 1030, 1200)]
    results[3] = dataclasses.replace(results[3], label="qwen2.5-7b full adamw bf16 b1 s512")
    rows = [
        {
            "test": "test_x.py::test_x",
            "label": r.label,
            "peak_bytes": r.peak_bytes,
            "budget_bytes": None,
            "baseline_bytes": None,
            "status": "ok",
            "failed": False,
            "action": None,
            "notes": [],
            "result": r.to_dict(),
        }
        for r in results
    ]
    lines = list(Summary(rows=rows).lines(None))
    assert (
        "prediction error (fake meter vs measured reserved): 4 cases, median +2.0%, 3 within "
        "5%, worst +20.0% [qwen2.5-7b full adamw bf16 b1 s512]"
    ) in lines


def test_a_case_without_prediction_says_why() -> None:
    lines = list(summary_lines([("a", None, "qwen2-vl is not supported on the fake meter: x")]))
    assert lines == ["  no prediction for [a]: qwen2-vl is not supported on the fake meter: x"]
    assert list(summary_lines([("b", None, "")])) == []


def test_a_prediction_travels_in_the_result_and_its_baseline_entry() -> None:
    result = gpu_result(1000, 1100)
    assert MemoryResult.from_json(result.to_json()) == result
    assert result.baseline_dict()["prediction"]["reserved_bytes"] == 1100 * MIB
    # No prediction, no key: entries recorded before predictions existed stay unchanged.
    assert "prediction" not in dataclasses.replace(result, prediction=None).to_dict()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"reserved_bytes": -1}, "prediction.reserved_bytes=-1 is not an integer >= 0"),
        ({"reserved_bytes": True}, "prediction.reserved_bytes=True is not an integer >= 0"),
        ({"reserved": 5}, "unknown key prediction.reserved"),
        ({"unsupported": 3}, "prediction.unsupported=3 is not a string"),
    ],
)
def test_a_bad_prediction_in_a_baseline_names_the_key(bad: dict[str, object], message: str) -> None:
    data = gpu_result(1000, 1100).to_dict()
    data["prediction"] = {**data["prediction"], **bad}
    with pytest.raises(ValueError, match=re.escape(message)):
        MemoryResult.from_dict(data)


CASES = """
import pytest

@pytest.mark.vram_budget(gb=1, model="tiny-llama", batch=2, seq=64)
def test_lora(vram):
    vram.step(method="lora")

@pytest.mark.vram_budget(gb=1, model="tiny-llama", batch=2, seq=64)
def test_offload(vram):
    vram.step(zero=2, offload="optimizer", ranks=2)

@pytest.mark.vram_budget(gb=1, model="tiny-llama", batch=2, seq=64)
def test_8bit(vram):
    vram.step(optimizer="adamw-8bit")
"""


def test_host_cases_are_calibrated_against_the_real_engine(vram_project) -> None:
    """The fake meter agrees with the host meter to the byte without DeepSpeed; a ZeRO case
    compares the simulation with the real engine, and any error fails under 0%."""
    vram_project.write(CASES)
    result = vram_project.run("--vram-update", "--vram-calibrate=0%")
    text = output(result)
    offload = "tiny-llama full adamw bf16 b2 s64 zero2 offload-optimizer r2"
    entry = vram_project.entry("test_offload", offload)
    predicted, measured = entry["prediction"]["storage_bytes"], entry["peak_bytes"]
    exact = predicted == measured
    result.assert_outcomes(passed=3 if exact else 2, failed=0 if exact else 1)
    if not exact:
        shown = format_pair(predicted, measured)
        assert (
            f"the fake meter predicted {shown[0]} storage, measured {shown[1]} "
            f"({predicted / measured - 1:+.1%}), beyond --vram-calibrate 0.0% [{offload}]"
        ) in text
    lora = vram_project.entry("test_lora", "tiny-llama lora adamw bf16 b2 s64")
    assert lora["prediction"]["storage_bytes"] == lora["peak_bytes"]  # to the byte
    assert lora["prediction"]["reserved_bytes"] >= lora["prediction"]["allocated_bytes"]
    assert re.search(
        r"^prediction error \(fake meter vs measured storage\): 2 cases, median [+-]\d+\.\d%, "
        r"\d within 5%, worst [+-]\d+\.\d% \[",
        text,
        re.MULTILINE,
    ), text
    assert (
        "  no prediction for [tiny-llama full adamw-8bit bf16 b2 s64]: adamw-8bit is not " in text
    )
    # Without the option nothing is traced twice, and the stored predictions stay as they were.
    again = vram_project.run()
    again.assert_outcomes(passed=3)
    assert "prediction error" not in output(again)
