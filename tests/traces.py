"""Two fake-meter traces of one step held equal event for event: what a replay (of a step or
of repeated layers) must leave unchanged against tracing everything."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_vram.meters.fake import FakeMeter
    from pytest_vram.meters.host import HostMeter
    from pytest_vram.result import MemoryResult


def events(meter: FakeMeter | HostMeter) -> list[tuple[int, ...]]:
    ev = meter.ledger.events
    return list(zip(ev.kind, ev.nbytes, ev.op, ev.live_bytes, strict=True))


def assert_same_trace(
    replayed: MemoryResult, with_replay: FakeMeter, traced: MemoryResult, without: FakeMeter
) -> None:
    """The allocator's prediction, every allocation and free, and the timeline."""
    assert (replayed.allocated_bytes, replayed.reserved_bytes) == (
        traced.allocated_bytes,
        traced.reserved_bytes,
    )
    assert events(with_replay) == events(without)
    assert replayed.timeline == traced.timeline
