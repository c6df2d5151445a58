"""The host meter's offload accounting: what DeepSpeed moves to host memory leaves the device
total when it is tagged, and roles noted mid-step still count at the peak."""

from __future__ import annotations

import torch

from pytest_vram.meters.base import Roles
from pytest_vram.meters.host import HostMeter

MIB = 2**20


def mib_tensor() -> torch.Tensor:
    return torch.ones(MIB // 4)  # 1 MiB of fp32


def test_tagged_storage_leaves_the_device_total() -> None:
    with HostMeter() as meter:
        meter.step_begin()
        a = mib_tensor()
        b = mib_tensor()
        meter.offloaded([b])
        assert (meter.ledger.live_bytes, meter.ledger.host_bytes) == (MIB, MIB)
        del b
        assert meter.ledger.host_bytes == 0  # freeing host memory is counted too
        m = meter.step_end(Roles([], [], [], []))
    assert m.peak_bytes == 2 * MIB  # b was on the device until it was tagged
    assert m.host_offload_bytes == MIB
    del a


def test_allocations_in_a_host_scope_never_touch_the_device_peak() -> None:
    with HostMeter() as meter:
        meter.step_begin()
        keep = mib_tensor()
        with meter.host_scope():
            state = [mib_tensor() for _ in range(3)]
            tmp = state[0] * 2  # a temporary of the offloaded step
            del tmp
        after = mib_tensor()
        m = meter.step_end(Roles([], [], [], state))
    assert m.peak_bytes == 2 * MIB  # keep + after; the host step's 4 MiB are not device memory
    assert m.host_offload_bytes == 4 * MIB
    assert m.breakdown.optimizer_bytes == 0  # the state is on the host, not in the device peak
    del keep, after


def test_roles_noted_mid_step_count_at_the_peak_after_they_are_freed() -> None:
    with HostMeter() as meter:
        meter.step_begin()
        grad = mib_tensor()
        meter.note(Roles([], [], [grad], []))
        peak_tmp = mib_tensor()
        del grad, peak_tmp  # gone before step_end, like DeepSpeed's gradient partitions
        m = meter.step_end(Roles([], [], [], []))
    assert m.peak_bytes == 2 * MIB
    assert m.breakdown.grad_bytes == MIB and m.breakdown.activation_bytes == MIB
