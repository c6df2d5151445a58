"""MemoryResult travels as JSON (worker -> pytest, baselines): it must round-trip exactly."""

from __future__ import annotations

import json

import pytest

from pytest_vram import MemoryResult, StepSpec
from pytest_vram.meters.host import HostMeter
from pytest_vram.step import run_step


@pytest.fixture(scope="module")
def result() -> MemoryResult:
    return run_step(StepSpec(model="tiny-llama", method="lora", batch=1, seq=16), HostMeter())


def test_json_round_trip(result: MemoryResult) -> None:
    text = result.to_json()
    again = MemoryResult.from_json(text)
    assert again == result
    assert again.to_json() == text
    data = json.loads(text)
    assert data["schema"] == 1 and data["spec"]["method"] == "lora"
    assert set(data["versions"]) >= {"python", "torch", "transformers", "peft"}


def test_unknown_schema_is_refused(result: MemoryResult) -> None:
    data = result.to_dict() | {"schema": 99}
    with pytest.raises(ValueError, match="result schema 99 is not 1"):
        MemoryResult.from_dict(data)


def test_result_without_spec_round_trips(result: MemoryResult) -> None:
    import dataclasses

    bare = dataclasses.replace(result, spec=None, label="mod.fn")
    assert MemoryResult.from_json(bare.to_json()) == bare


def _gpu_like(result: MemoryResult, peak_bytes: int, **environment: str) -> MemoryResult:
    import dataclasses

    return dataclasses.replace(
        result, peak_bytes=peak_bytes, environment=environment, device="nvidia-h100-80gb-hbm3"
    )


def test_environment_round_trips_and_old_entries_load_without_it(result: MemoryResult) -> None:
    gpu = _gpu_like(result, result.peak_bytes, mig="off", nvml="per-process")
    assert MemoryResult.from_json(gpu.to_json()).environment == {
        "mig": "off",
        "nvml": "per-process",
    }
    old = result.to_dict()
    del old["environment"]  # a baseline written before the field existed
    assert MemoryResult.from_dict(old).environment == {}


def _drift_reason(now: MemoryResult, before: MemoryResult) -> str:
    from pytest_vram.verdict import Budget, judge

    budget = Budget.from_gib(None, 0.05)
    verdict = judge("t.py::test", now, budget, before, strict=False, update=False, record_hint="r")
    (reason,) = verdict.reasons
    return reason


def test_drift_names_what_changed_in_the_environment(result: MemoryResult) -> None:
    alloc = {"env:PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    before = _gpu_like(result, 1000, **alloc, mig="off")
    now = _gpu_like(result, 1200, mig="off", nvml="device-wide")
    assert _drift_reason(now, before).endswith(
        "; environment changed: env:PYTORCH_CUDA_ALLOC_CONF expandable_segments:True -> -, "
        "nvml - -> device-wide"
    )
    same = _drift_reason(_gpu_like(result, 1200, mig="off"), _gpu_like(result, 1000, mig="off"))
    assert same.endswith("; the recorded environment is the same")
    # A baseline recorded without an environment (the host meter's, or an older one).
    assert "environment" not in _drift_reason(_gpu_like(result, 1200), _gpu_like(result, 1000))
