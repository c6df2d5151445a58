"""The fake meter's reserved prediction starts each step as the cuda meter does: the first
after ``empty_cache()`` (the blocks the model's build cached are released), later ones with
what the steps before them cached."""

from __future__ import annotations

import torch

from pytest_vram.meters.base import Roles
from pytest_vram.meters.fake import FakeMeter

MIB = 2**20


def test_the_first_step_starts_without_the_blocks_the_build_cached() -> None:
    meter = FakeMeter()
    with meter:
        # A build that frees what it made, as a QLoRA load drops the bf16 weights it quantized.
        build = torch.empty(64 * MIB, dtype=torch.uint8)
        del build
        meter.step_begin()
        first = torch.empty(3 * MIB, dtype=torch.uint8)
        measure = meter.step_end(Roles(params=[], buffers=[], grads=[], optimizer=[first]))
        del first
        meter.step_begin()
        second = torch.empty(30 * MIB, dtype=torch.uint8)
        later = meter.step_end(Roles(params=[], buffers=[], grads=[], optimizer=[second]))
    # 3 MiB takes a 20 MiB segment of its own; the build's 64 MiB segment was released.
    assert (measure.allocated_bytes, measure.reserved_bytes) == (3 * MIB, 20 * MIB)
    # The first step's segment stays cached into the second, beside the 30 MiB one.
    assert (later.allocated_bytes, later.reserved_bytes) == (30 * MIB, 50 * MIB)
