"""memory_viz snapshots from hand-built event logs: resizes, zero-byte storages, devices,
shared frames, a GPU snapshot's timeline, and writing whole or not at all. The snapshots of
real steps, and through the plugin, are in test_memory_viz.py.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from test_memory_viz import read_with_torch

from pytest_vram.meters.events import ALLOC, FREE, EventLog
from pytest_vram.meters.memory_viz import (
    BASE_ADDRESS,
    snapshot_of,
    timeline_of_snapshot,
    write_pickle,
    write_snapshot,
)
from pytest_vram.timeline import Phase

# -- the logic, on hand-built logs --------------------------------------------------------------


def _log(*events: tuple[int, int, int], ops: int = 1) -> EventLog:
    """A log of (kind, storage id, bytes), ``ops`` operators apart."""
    log = EventLog()
    live = 0
    for kind, sid, nbytes in events:
        log.ops += ops
        live += nbytes if kind == ALLOC else -nbytes
        log.add(kind, sid, nbytes, live)
    return log


def test_a_resized_storage_is_a_new_segment_and_addresses_are_never_reused() -> None:
    log = _log((ALLOC, 7, 100), (FREE, 7, 100), (ALLOC, 7, 600), (ALLOC, 8, 512))
    snapshot = snapshot_of(log)
    trace = snapshot["device_traces"][0]
    allocs = [(e["addr"], e["size"]) for e in trace if e["action"] == "alloc"]
    assert allocs == [
        (BASE_ADDRESS, 100),
        (BASE_ADDRESS + 512, 600),
        (BASE_ADDRESS + 512 + 1024, 512),
    ]
    assert [e["time_us"] for e in trace] == [1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert [(s["address"], s["total_size"], s["segment_type"]) for s in snapshot["segments"]] == [
        (BASE_ADDRESS + 512, 1024, "small"),
        (BASE_ADDRESS + 1536, 512, "small"),
    ]
    assert snapshot_of(log) == snapshot  # deterministic
    read_with_torch(snapshot)


def test_zero_byte_storages_hold_no_memory_and_are_left_out() -> None:
    log = _log((ALLOC, 1, 0), (ALLOC, 2, 4 << 20), (FREE, 1, 0))
    snapshot = snapshot_of(log)
    assert [e["action"] for e in snapshot["device_traces"][0]] == ["segment_alloc", "alloc"]
    assert snapshot["segments"][0]["segment_type"] == "large"
    assert timeline_of_snapshot(snapshot).live_bytes == (4 << 20,)


def test_an_empty_log_is_an_empty_snapshot() -> None:
    snapshot = snapshot_of(EventLog())
    assert (snapshot["segments"], snapshot["device_traces"]) == ([], [[]])
    assert "total_reserved: 0.0B" in read_with_torch(snapshot)["segsum"]
    timeline = timeline_of_snapshot(snapshot)
    assert (timeline.x, timeline.live_bytes, timeline.events) == ((), (), 0)


def test_a_log_that_frees_what_it_does_not_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="storage 3 frees 8 bytes it does not hold"):
        snapshot_of(_log((FREE, 3, 8)))
    with pytest.raises(ValueError, match="storage 3 is allocated twice"):
        snapshot_of(_log((ALLOC, 3, 8), (ALLOC, 3, 8)))


def test_another_device_has_its_own_trace() -> None:
    snapshot = snapshot_of(_log((ALLOC, 1, 64)), device=1)
    assert snapshot["device_traces"][0] == [] and len(snapshot["device_traces"][1]) == 2
    assert snapshot["segments"][0]["device"] == 1
    assert timeline_of_snapshot(snapshot, device=1).live_bytes == (64,)
    assert timeline_of_snapshot(snapshot, device=0).live_bytes == ()
    assert timeline_of_snapshot(snapshot, device=5).live_bytes == ()


def _alloc_here(log: EventLog, sid: int) -> int:
    line = sys._getframe().f_lineno + 1
    log.add(ALLOC, sid, 8, 8 * (sid + 1))
    return line


def test_frames_are_shared_between_events_of_one_stack() -> None:
    log = EventLog(frames=True)
    line = _alloc_here(log, 0)
    _alloc_here(log, 1)
    trace = snapshot_of(log)["device_traces"][0]
    assert [e["action"] for e in trace] == ["segment_alloc", "alloc"] * 2
    innermost, caller = trace[0]["frames"][:2]
    assert innermost == {"filename": __file__, "line": line, "name": "_alloc_here"}
    assert caller["name"] == "test_frames_are_shared_between_events_of_one_stack"
    # Two calls from two lines: two stacks, sharing their innermost frame's dict.
    assert trace[0]["frames"] is trace[1]["frames"] is not trace[2]["frames"]
    assert trace[2]["frames"][0] is innermost


def test_events_replayed_from_another_log_keep_its_stacks() -> None:
    """A layer probe's events replayed into the meter's log: each keeps the stack it was made
    with, and one stack of the probe is one stack here however often it is replayed."""
    probe, log = EventLog(frames=True), EventLog(frames=True)
    _alloc_here(probe, 0)
    _alloc_here(probe, 1)
    _alloc_here(log, 9)  # a stack of the log's own first: the probe's are not at its indexes
    for sid in range(4):
        log.add_replayed(sid % 2, 10 + sid, 8, 0, source=probe)
    assert [log.frames_of(i) for i in range(1, 5)] == [probe.frames_of(i % 2) for i in range(4)]
    assert log.stack[1] == log.stack[3] != log.stack[2] == log.stack[4]
    assert len(log._stacks) == 3  # the log's own and the probe's two


def test_a_gpu_snapshots_timeline() -> None:
    """As torch writes it: epoch microseconds, a ring buffer that lost its oldest events (a
    block freed here was allocated before them), a pending free, other devices and actions."""
    t0 = 1_700_000_000_000_000

    def event(action: str, addr: int, size: int, dt: int) -> dict[str, Any]:
        return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": t0 + dt}

    trace = [
        event("segment_alloc", 0x1000, 2 << 20, 0),
        event("alloc", 0x1000, 1000, 0),
        event("free_requested", 0x9000, 300, 5),
        event("free_completed", 0x9000, 300, 6),
        event("alloc", 0x1400, 700, 9),
        event("free_requested", 0x1000, 1000, 12),  # pending: completed after the snapshot
        event("snapshot", 0, 0, 20),
    ]
    block = {"size": 1024, "requested_size": 1000, "state": "active_pending_free"}
    other = {"size": 1024, "requested_size": 700, "state": "active_allocated"}
    cached = {"size": 5000, "requested_size": 0, "state": "inactive"}
    snapshot = {
        "device_traces": [[event("alloc", 0x5000, 64, 1)], trace],
        "segments": [
            {"device": 1, "address": 0x1000, "blocks": [block, other, cached]},
            {"device": 0, "address": 0x5000, "blocks": [{**other, "requested_size": 64}]},
        ],
    }
    phases = [
        Phase(t0 - 50, "setup", 0),
        Phase(t0 - 10, "forward", 1),
        Phase(t0 + 6, "backward", 1),
    ]
    timeline = timeline_of_snapshot(snapshot, phases, device=1)
    # 300 bytes were live before the first event kept: 1700 at the end, less +1000 -300 +700.
    assert timeline.live_bytes == (1300, 1000, 1700)
    assert timeline.x == (0, 6, 9)
    assert timeline.phases == (Phase(0, "forward", 1), Phase(6, "backward", 1))
    assert timeline.peak_x == 9


# -- writing ------------------------------------------------------------------------------------


def test_a_snapshot_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "case.pickle"
    write_snapshot(_log((ALLOC, 1, 64)), str(path))
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        write_pickle({"segments": [lambda: None]}, str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.pickle"]
    with pytest.raises(FileNotFoundError):
        write_pickle({}, str(tmp_path / "missing" / "x.pickle"))
