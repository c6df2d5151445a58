"""The fake meter replays a later step's forward and backward from the first step's
(``meters.repeat``): the same numbers as tracing it, for fewer dispatched operators.

Each case is held to two references: the host meter, which runs every step of a tiny model for
real, and the fake meter itself with replay turned off, event for event, on a real-size model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from traces import assert_same_trace

from pytest_vram import StepSpec, methods
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter
from pytest_vram.methods.full import Full
from pytest_vram.result import MemoryResult
from pytest_vram.step import run_step

pytest.importorskip("peft")

CASES = [
    {"method": "full"},
    {"method": "full", "steps": 3},
    {"method": "full", "precision": "amp-bf16"},
    {"method": "freeze"},
    {"method": "lora", "grad_ckpt": True},
    {"method": "lora", "stage": "dpo"},
    {"method": "dora", "optimizer": "sgd", "optimizer_options": {"momentum": 0.9}},
    {"method": "full", "optimizer": "adafactor"},
    {"method": "qlora"},
]


def _traced(spec: StepSpec, replay: bool) -> tuple[MemoryResult, FakeMeter]:
    meter = FakeMeter()
    if not replay:
        meter.replay_step = lambda step: False  # type: ignore[method-assign]
    return run_step(spec, meter), meter


def _same_numbers(a: MemoryResult, b: MemoryResult) -> None:
    assert a.peak_bytes == b.peak_bytes
    assert a.step_peak_bytes == b.step_peak_bytes
    assert a.breakdown == b.breakdown


@pytest.mark.parametrize("fields", CASES, ids=lambda f: "-".join(map(str, f.values())))
def test_replayed_steps_measure_what_the_host_meter_runs(fields: dict[str, Any]) -> None:
    if fields["method"] == "qlora":
        pytest.importorskip("bitsandbytes")
    spec = StepSpec.from_kwargs(model="tiny-llama", batch=2, seq=64, **fields)
    host = run_step(spec, HostMeter())
    fake, meter = _traced(spec, replay=True)
    assert meter.replayed_steps == spec.steps - 1
    _same_numbers(fake, host)
    assert fake.timeline is not None and host.timeline is not None
    assert [(p.name, p.step) for p in fake.timeline.phases] == [
        (p.name, p.step) for p in host.timeline.phases
    ]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_replayed_real_size_step_is_the_traced_one_event_for_event(method: str) -> None:
    spec = StepSpec(model="llama-7b", method=method, batch=1, seq=32)
    replayed, with_replay = _traced(spec, replay=True)
    traced, without = _traced(spec, replay=False)
    assert (with_replay.replayed_steps, without.replayed_steps) == (1, 0)
    _same_numbers(replayed, traced)
    assert_same_trace(replayed, with_replay, traced, without)


def test_optimizers_that_change_the_backward_are_traced_every_step() -> None:
    pytest.importorskip("lomo_optim")
    for optimizer in ("lomo", "badam"):
        pytest.importorskip({"lomo": "lomo_optim", "badam": "badam"}[optimizer])
        spec = StepSpec(model="tiny-llama", method="full", optimizer=optimizer, batch=1, seq=32)
        fake, meter = _traced(spec, replay=True)
        assert meter.replayed_steps == 0
        _same_numbers(fake, run_step(spec, HostMeter()))


class _Caching(Full):
    """Full training whose first forward keeps a tensor for later steps, as a lazily built
    buffer or cache would: the first step does not prove the second repeats it."""

    name = "caching"

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        def keep_once(module: torch.nn.Module, args: Any) -> None:
            if not hasattr(module, "_kept"):
                module._kept = torch.zeros(4096)  # type: ignore[assignment]

        model.register_forward_pre_hook(keep_once)
        return super().prepare(model, spec)


@pytest.fixture
def caching() -> Iterator[str]:
    saved = methods.snapshot()
    methods.register(_Caching())
    yield _Caching.name
    methods.restore(saved)


def test_a_first_step_that_keeps_what_it_made_is_not_replayed(caching: str) -> None:
    spec = StepSpec(model="tiny-llama", method=caching, batch=1, seq=32)
    fake, meter = _traced(spec, replay=True)
    assert meter.replayed_steps == 0
    _same_numbers(fake, run_step(spec, HostMeter()))
