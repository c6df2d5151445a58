"""The meter protocol: what every meter has, the optional capabilities each meter declares, and
run_step using a capability exactly when the meter has it.

The meters here are real ones: they read the host meter's ledger, and differ from it only in
what they declare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
import torch

from pytest_vram import StepSpec, zoo
from pytest_vram.meters.base import (
    FIXED_FINGERPRINTS,
    DeviceIndexed,
    HostOffloadTagging,
    MemorySnapshots,
    Meter,
    Roles,
)
from pytest_vram.meters.cuda import CudaMeter
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter
from pytest_vram.result import StepMeasure
from pytest_vram.step import library_versions, run_step

SPEC = StepSpec(model="tiny-llama", batch=1, seq=16)


class BareMeter(Meter):
    """Only what every meter must have; the host meter's ledger reads the bytes."""

    name = "bare"
    device = "cpu"

    def __init__(self) -> None:
        self.host = HostMeter()
        self.calls: list[str] = []

    def fingerprint(self) -> str:
        return "bare-cpu"

    def __enter__(self) -> BareMeter:
        self.calls.append("enter")
        self.host.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.__exit__(*exc)
        self.calls.append("exit")

    def step_begin(self) -> None:
        self.calls.append("begin")
        self.host.step_begin()

    def step_end(self, roles: Roles) -> StepMeasure:
        self.calls.append("end")
        return self.host.step_end(roles)


class SnapshotMeter(BareMeter, MemorySnapshots):
    """Declares every member it can: notes, versions, environment, its peak source, snapshots."""

    name = "snapshotting"
    peak_source = "allocated"

    def __init__(self) -> None:
        super().__init__()
        self.snapshot_label: str | None = None
        self.snapshot_path: str | None = None
        self.notes = ("a note of the meter",)
        self.noted_grads = 0
        self.label_at_enter: str | None = None

    def __enter__(self) -> SnapshotMeter:
        self.label_at_enter = self.snapshot_label
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.snapshot_path = f"{self.snapshot_label}.pickle"

    def note(self, roles: Roles) -> None:
        self.noted_grads += len(roles.grads)
        self.host.note(roles)

    def versions(self) -> Mapping[str, str]:
        return {"meter-driver": "1.2"}

    def environment(self) -> Mapping[str, str]:
        return {"env:METER_SETTING": "on"}


class TracingMeter(BareMeter):
    """Declares that DeepSpeed cannot run under it, whatever its name says."""

    name = "host"
    simulates_zero = True


def test_each_meter_declares_the_capabilities_it_has() -> None:
    host, fake, cuda = HostMeter(), FakeMeter(), CudaMeter(sample_nvml=False)
    capabilities = (HostOffloadTagging, MemorySnapshots, DeviceIndexed)
    assert [isinstance(host, c) for c in capabilities] == [True, True, False]
    assert [isinstance(fake, c) for c in capabilities] == [False, True, False]
    assert [isinstance(cuda, c) for c in capabilities] == [True, True, True]
    assert [m.simulates_zero for m in (host, fake, cuda)] == [False, True, False]
    assert [m.peak_source for m in (host, fake, cuda)] == ["storage", "storage", "reserved"]
    assert not isinstance(BareMeter(), (HostOffloadTagging, MemorySnapshots, DeviceIndexed))


def test_fixed_fingerprints_come_from_the_meters() -> None:
    assert HostMeter().fingerprint() == HostMeter.FINGERPRINT == "host-cpu"
    assert FakeMeter().fingerprint() == FakeMeter.FINGERPRINT == "fake"
    # The pytest process (torch-free) knows them before any case runs: the same names.
    fixed = {"host": HostMeter.FINGERPRINT, "fake": FakeMeter.FINGERPRINT}
    assert FIXED_FINGERPRINTS == fixed


def test_a_ranks_device_index_moves_the_cuda_meter() -> None:
    meter = CudaMeter(device_index=0, sample_nvml=False)
    meter.use_device(3)
    assert (meter.device_index, meter.device) == (3, "cuda:3")


def test_a_meter_without_optional_capabilities_runs_a_step() -> None:
    spec = dataclasses.replace(SPEC, steps=3)
    run_step(spec, HostMeter())  # a library's first use may leave a cached tensor: not the step
    host = run_step(spec, HostMeter())
    meter = BareMeter()
    bare = run_step(spec, meter)
    assert meter.calls == ["enter", *["begin", "end"] * 3, "exit"]  # a window per step
    assert (bare.meter, bare.device, bare.peak_source) == ("bare", "bare-cpu", "storage")
    assert (bare.notes, bare.environment, bare.snapshot_path) == ((), {}, None)
    assert bare.versions == library_versions()
    # Full AdamW holds its gradients at step_end: the breakdown needs no noted roles.
    assert bare.peak_bytes == host.peak_bytes
    assert bare.breakdown == host.breakdown


def test_a_meter_with_capabilities_has_them_used() -> None:
    meter = SnapshotMeter()
    result = run_step(SPEC, meter)
    assert meter.label_at_enter == SPEC.label  # set before the meter is entered
    assert result.snapshot_path == f"{SPEC.label}.pickle"
    assert (result.meter, result.peak_source) == ("snapshotting", "allocated")
    assert result.notes[-1] == "a note of the meter"
    assert result.versions["meter-driver"] == "1.2" and "torch" in result.versions
    assert result.environment == {"env:METER_SETTING": "on"}
    model = zoo.build_model(SPEC.model, torch.float32, "cpu")
    # Each gradient as it arrived in backward, in every step.
    assert meter.noted_grads == SPEC.steps * len(list(model.parameters()))


def test_zero_is_simulated_because_the_meter_says_so_not_by_its_name() -> None:
    spec = StepSpec(model="tiny-llama", batch=1, seq=16, zero=2, ranks=2)
    result = run_step(spec, TracingMeter())  # no DeepSpeed ranks are forked
    assert result.meter == "host"
    assert len(result.ranks) == 2
    assert result.notes[-1].startswith("simulated ZeRO-2 layout over 2 ranks")
    assert result.breakdown.grad_bytes > 0  # laid out per rank, not traced


@pytest.mark.parametrize("optimizer", ["lomo"])
def test_gradients_dropped_inside_backward_count_through_noted_roles(optimizer: str) -> None:
    pytest.importorskip("lomo_optim")
    spec = StepSpec(model="tiny-llama", optimizer=optimizer, batch=1, seq=16)
    noted = run_step(spec, SnapshotMeter())
    unnoted = run_step(spec, BareMeter())
    # LOMO frees each gradient once it has applied it: only a meter that takes notes sees them.
    assert noted.breakdown.grad_bytes > 0
    assert unnoted.breakdown.grad_bytes == 0
    assert noted.peak_bytes == unnoted.peak_bytes
