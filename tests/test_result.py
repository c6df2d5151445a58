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
