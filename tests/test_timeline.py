"""Memory over a case's steps: what the host and fake meters record, its phases, its
decimation, and how it travels in a result (never in a baseline)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_vram.meters import make_meter
from pytest_vram.meters.events import ALLOC, FREE, EventLog
from pytest_vram.meters.host import HostMeter
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.step import run_step
from pytest_vram.timeline import Phase, Timeline, decimate
from pytest_vram.user_step import measure_fn

SPEC = StepSpec(model="tiny-llama", method="full", batch=2, seq=64)


@pytest.fixture(scope="module")
def measured() -> tuple[MemoryResult, EventLog]:
    meter = HostMeter()
    return run_step(SPEC, meter), meter.ledger.events


def test_the_phases_of_each_step_follow_in_order(measured: tuple[MemoryResult, EventLog]) -> None:
    result, _ = measured
    assert result.timeline is not None
    phases = [(p.name, p.step) for p in result.timeline.phases]
    assert phases == [
        ("setup", 0),
        *((name, step) for step in (1, 2) for name in ("forward", "backward", "optimizer")),
    ]
    starts = [p.start for p in result.timeline.phases]
    assert starts == sorted(set(starts))


def test_the_highest_point_of_the_steps_is_the_measured_peak(
    measured: tuple[MemoryResult, EventLog],
) -> None:
    result, log = measured
    assert result.timeline is not None
    first_step = result.timeline.phases[1].start
    in_steps = [b for op, b in zip(log.op, log.live_bytes, strict=True) if op >= first_step]
    assert max(in_steps) == result.peak_bytes
    # The recorded timeline keeps that point: full AdamW peaks in step 1's optimizer phase,
    # where the moments are created.
    assert result.timeline.peak_bytes == max(log.live_bytes)
    peak_x = result.timeline.peak_x
    assert peak_x is not None
    phase = result.timeline.phase_at(peak_x)
    assert phase is not None and (phase.name, phase.step) == ("optimizer", 1)


def test_every_event_balances_against_the_live_total(
    measured: tuple[MemoryResult, EventLog],
) -> None:
    _, log = measured
    live = 0
    for kind, nbytes, after in zip(log.kind, log.nbytes, log.live_bytes, strict=True):
        live += nbytes if kind == ALLOC else -nbytes
        assert live == after
    assert len(log) == len(log.op) > 1000
    assert all(log.stack[i] == -1 for i in range(len(log)))  # frames only for a snapshot


def test_the_fake_meter_records_the_same_shape() -> None:
    host = run_step(SPEC, make_meter("host"))
    fake = run_step(SPEC, make_meter("fake"))
    assert host.timeline is not None and fake.timeline is not None
    names = [(p.name, p.step) for p in fake.timeline.phases]
    assert names == [(p.name, p.step) for p in host.timeline.phases]
    assert fake.timeline.peak_bytes == pytest.approx(host.timeline.peak_bytes, rel=0.01)


def _train(steps: int) -> torch.nn.Module:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(steps):
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_a_users_function_is_shaded_by_its_optimizer_steps() -> None:
    result = measure_fn(_train, (3,), {}, make_meter("host"))
    assert result.timeline is not None
    phases = [(p.name, p.step) for p in result.timeline.phases]
    assert phases == [
        ("user", 1),
        ("optimizer", 1),
        ("user", 2),
        ("optimizer", 2),
        ("user", 3),
        ("optimizer", 3),
        ("user", 4),
    ]


def test_a_resize_is_a_free_and_an_allocation() -> None:
    with HostMeter() as meter:
        t = torch.empty(16, dtype=torch.uint8)
        t.untyped_storage().resize_(64)
        del t
    log = meter.ledger.events
    assert list(zip(log.kind, log.nbytes, log.live_bytes, strict=True)) == [
        (ALLOC, 16, 16),
        (FREE, 16, 0),
        (ALLOC, 64, 64),
        (FREE, 64, 0),
    ]


# -- decimation --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=0, max_size=3000),
    st.integers(min_value=4, max_value=300),
)
def test_decimation_keeps_the_ends_the_peak_and_the_order(values: list[int], most: int) -> None:
    x = list(range(0, 3 * len(values), 3))
    kept_x, kept = decimate(x, values, most)
    assert len(kept_x) == len(kept) <= max(most, len(values) if len(values) <= most else most)
    assert list(kept_x) == sorted(set(kept_x))
    assert all(values[x.index(k)] == v for k, v in zip(kept_x, kept, strict=True))
    if values:
        assert (kept_x[0], kept_x[-1]) == (x[0], x[-1])
        assert max(kept) == max(values)
        assert min(kept) == min(values)
        # the first point at the peak is kept: peak_x is where the peak was first reached
        assert kept_x[kept.index(max(kept))] == x[values.index(max(values))]


def test_a_short_timeline_is_kept_whole() -> None:
    assert decimate([1, 2, 3], [5, 9, 7]) == ((1, 2, 3), (5, 9, 7))


# -- in results and baselines -----------------------------------------------------------------


def test_a_timeline_and_a_snapshot_travel_in_the_result_and_never_in_a_baseline(
    measured: tuple[MemoryResult, EventLog],
) -> None:
    result, _ = measured
    ran = dataclasses.replace(result, snapshot_path="/tmp/pytest-vram-snapshots-x/case.pickle")
    ranked = dataclasses.replace(ran, ranks=(ran, ran))
    back = MemoryResult.from_json(ranked.to_json())
    assert back == ranked
    stored = ranked.baseline_dict()
    # What one run made is not kept: a baseline stays "unchanged" when it is measured again.
    assert "timeline" not in stored and stored["snapshot_path"] is None
    assert all("timeline" not in r and r["snapshot_path"] is None for r in stored["ranks"])
    assert MemoryResult.from_dict(stored).timeline is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": [0, "a"], "live_bytes": [1, 2]}, "timeline.x holds 'a', not an integer"),
        ({"x": [0, 1], "live_bytes": [1]}, "timeline x has 2 points and live_bytes 1"),
        ({"unit": "ms"}, "timeline unit 'ms' is not one of op, us"),
        ({"phases": [[0, "warmup", 1]]}, "timeline phase 'warmup' is not one of setup"),
    ],
)
def test_a_bad_timeline_in_a_result_names_what_is_wrong(
    measured: tuple[MemoryResult, EventLog], change: dict[str, object], message: str
) -> None:
    result, _ = measured
    data = json.loads(dataclasses.replace(result, ranks=(result,)).to_json())
    data["ranks"][0]["timeline"].update(change)
    with pytest.raises(ValueError, match=r"^ranks\[0\]\." + message.replace("(", r"\(")):
        MemoryResult.from_dict(data)


def test_phase_at_is_the_phase_under_way() -> None:
    timeline = Timeline(
        "op", (1, 5, 9), (10, 30, 20), (Phase(1, "setup", 0), Phase(4, "forward", 1))
    )
    assert timeline.phase_at(0) is None
    assert timeline.phase_at(3) == Phase(1, "setup", 0)
    assert timeline.phase_at(4) == Phase(4, "forward", 1)
    assert (timeline.peak_x, timeline.peak_bytes) == (5, 30)
