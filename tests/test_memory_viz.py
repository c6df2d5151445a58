"""memory_viz snapshots from the host and fake meters: read back with torch's own readers
(``torch.cuda._memory_viz``), balanced against the meter's numbers, and kept by the plugin.

The tests load the pickles they check; pytest-vram itself only writes them.
"""

from __future__ import annotations

import copy
import gc
import pickle
import pickletools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.cuda import _memory_viz

from conftest import LABEL, SMALL, output
from pytest_vram.meters.base import MemorySnapshots
from pytest_vram.meters.events import EventLog
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter
from pytest_vram.meters.memory_viz import (
    snapshot_of,
    timeline_of_snapshot,
    write_snapshot,
)
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.step import run_step

viz: Any = _memory_viz  # torch's readers are untyped
SPEC = StepSpec(model="tiny-llama", method="lora", batch=2, seq=64)
EVERYTHING = 10**9  # max_points that keeps every point of a timeline
# The opcodes memory_viz's own unpickler (MemoryViz.js ``unpickle``) reads, protocols 2 to 4.
JS_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET",
    "LONG_BINGET", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND",
    "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BININT", "BININT1",
    "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "NEWTRUE", "NEWFALSE",
    "NONE",
}  # fmt: skip

Case = tuple[MemoryResult, EventLog, dict[str, Any], Path]


def _load(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        snapshot: dict[str, Any] = pickle.load(f)
    return snapshot


def _measure(meter: HostMeter | FakeMeter, log_of: Any) -> Case:
    result = run_step(SPEC, meter)
    assert result.snapshot_path is not None
    return result, log_of(meter), _load(result.snapshot_path), Path(result.snapshot_path)


@pytest.fixture(scope="module")
def host_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    meter = HostMeter(snapshot_dir=str(tmp_path_factory.mktemp("host")))
    return _measure(meter, lambda m: m.ledger.events)


@pytest.fixture(scope="module")
def fake_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    meter = FakeMeter(snapshot_dir=str(tmp_path_factory.mktemp("fake")))
    return _measure(meter, lambda m: m.ledger.events)


@pytest.fixture(params=["host", "fake"])
def case(request: pytest.FixtureRequest) -> Case:
    found: Case = request.getfixturevalue(f"{request.param}_case")
    return found


def _flame(text: str) -> str:
    """torch's flamegraph readers' last stage, which would download flamegraph.pl: kept as text."""
    return text


def read_with_torch(snapshot: dict[str, Any]) -> dict[str, str]:
    """Every reader of torch.cuda._memory_viz on ``snapshot``; each walks all its events or
    segments and raises on what it cannot read."""
    return {
        "trace": viz.trace(snapshot),
        "segsum": viz.segsum(snapshot),
        "segments": viz.segments(snapshot, format_flamegraph=_flame),
        "memory": viz.memory(snapshot, format_flamegraph=_flame),
        "compare": viz.compare(snapshot["segments"], [], format_flamegraph=_flame),
        "trace_plot": viz.trace_plot(snapshot),
        "trace_plot_segments": viz.trace_plot(snapshot, plot_segments=True),
        "trace_plot_filtered": viz.trace_plot(copy.deepcopy(snapshot), filter_freed=True),
        "segment_plot": viz.segment_plot(snapshot),
    }


def live_after_each(snapshot: dict[str, Any], device: int = 0) -> list[tuple[int, int]]:
    """(time_us, live bytes) after each alloc and free_completed, as memory_viz's trace view
    adds them up (it starts from nothing: these traces miss no event)."""
    live, out = 0, []
    for event in snapshot["device_traces"][device]:
        if event["action"] == "alloc":
            live += event["size"]
        elif event["action"] == "free_completed":
            live -= event["size"]
        else:
            continue
        out.append((event["time_us"], live))
    return out


# -- a real step, on the host and fake meters ------------------------------------------------


def test_every_torch_reader_reads_the_snapshot(case: Case) -> None:
    _, log, snapshot, path = case
    out = read_with_torch(snapshot)
    assert f"segments: {len(snapshot['segments'])}\n" in out["segsum"]
    assert out["trace"].startswith("Device 0 ---")
    assert len(snapshot["device_traces"][0]) > len(log)  # segment events besides the blocks'
    assert all("snapshot.pickle" in out[k] for k in ("trace_plot", "segment_plot"))
    # What the web page's unpickler can read: protocol 4 and its opcodes only.
    ops = {op.name for op, arg, _ in pickletools.genops(path.read_bytes())}
    assert ops <= JS_OPCODES, ops - JS_OPCODES
    assert next(pickletools.genops(path.read_bytes()))[1] == 4


def test_the_trace_peaks_at_the_meters_peak(case: Case) -> None:
    """``peak_bytes`` is the highest of the steps' peaks; each step's window opens at its
    step_begin (where its forward phase starts) with what is live then. The trace also covers
    the model's build, so its peak over the steps is compared, and over the whole case it is at
    least as high."""
    result, log, snapshot, _ = case
    live = live_after_each(snapshot)
    first_step = next(p.start for p in log.phases if p.name == "forward")
    before = [b for t, b in live if t <= first_step]
    in_steps = [b for t, b in live if t > first_step]
    assert max([before[-1], *in_steps]) == result.peak_bytes
    assert max(b for _, b in live) >= result.peak_bytes
    assert max(b for _, b in live) == max(log.live_bytes)


def test_the_segments_hold_what_is_live_at_the_end(case: Case) -> None:
    _, log, snapshot, _ = case
    blocks = [b for seg in snapshot["segments"] for b in seg["blocks"]]
    assert {b["state"] for b in blocks} == {"active_allocated"}
    assert sum(b["requested_size"] for b in blocks) == log.live_bytes[-1]
    assert live_after_each(snapshot)[-1][1] == log.live_bytes[-1]
    for seg in snapshot["segments"]:
        (block,) = seg["blocks"]  # one storage, one segment
        assert seg["total_size"] == block["size"] == -(-block["requested_size"] // 512) * 512
        assert seg["address"] == block["address"] and seg["address"] % 512 == 0
    total = sum(seg["total_size"] for seg in snapshot["segments"])
    assert f"total_reserved: {viz.Bytes(total)}" in viz.segsum(snapshot)


def test_an_allocation_names_the_models_code(case: Case) -> None:
    _, _, snapshot, _ = case
    allocs = [e for e in snapshot["device_traces"][0] if e["action"] == "alloc"]
    modeling = [
        e
        for e in allocs
        if e["frames"] and e["frames"][0]["filename"].endswith("/llama/modeling_llama.py")
    ]
    assert modeling, "no allocation names transformers' llama modeling code innermost"
    frame = modeling[0]["frames"][0]
    assert set(frame) == {"filename", "line", "name"} and frame["line"] > 0
    # The meter's and torch's dispatch plumbing are left out of every stack.
    files = {f["filename"] for e in allocs for f in e["frames"]}
    assert not [f for f in files if "/pytest_vram/meters/" in f or "/_dynamo/eval_frame" in f]
    assert any(f.endswith("/pytest_vram/step.py") for f in files)


def test_the_snapshots_timeline_is_the_logs(case: Case) -> None:
    _, log, snapshot, _ = case
    timeline = timeline_of_snapshot(snapshot, log.phases, max_points=EVERYTHING)
    kept = [i for i in range(len(log)) if log.nbytes[i]]  # zero-byte storages hold nothing
    first = log.op[kept[0]]
    assert timeline.live_bytes == tuple(log.live_bytes[i] for i in kept)
    assert timeline.x == tuple(log.op[i] - first for i in kept)
    assert timeline.events == len(kept) and timeline.unit == "us"
    assert [(p.name, p.step) for p in timeline.phases] == [(p.name, p.step) for p in log.phases]
    assert [p.start for p in timeline.phases[1:]] == [p.start - first for p in log.phases[1:]]
    decimated = timeline_of_snapshot(snapshot, log.phases)
    assert len(decimated.x) <= 1200 < len(kept)
    assert decimated.peak_bytes == log.timeline().peak_bytes == max(log.live_bytes)


def test_the_phases_are_annotations(host_case: Case) -> None:
    _, log, snapshot, _ = host_case
    notes = snapshot["external_annotations"]
    assert [(n["name"], n["stage"]) for n in notes[:4]] == [
        ("setup", "START"),
        ("setup", "END"),
        ("forward (step 1)", "START"),
        ("forward (step 1)", "END"),
    ]
    assert [n["time_us"] for n in notes[1:3]] == [log.phases[1].start] * 2
    assert {n["device"] for n in notes} == {0}


def test_the_fake_meter_is_labelled_and_names_its_snapshot(fake_case: Case, tmp_path: Path) -> None:
    result, _, _, path = fake_case
    assert path.name.startswith("tiny-llama-lora-adamw-bf16-b2-s64-")
    assert result.snapshot_path == str(path)
    meter = FakeMeter(snapshot_dir=str(tmp_path))
    assert isinstance(meter, MemorySnapshots)
    meter.snapshot_label = "x y"
    assert (meter.snapshot_label, meter.snapshot_path) == ("x y", None)


# -- storages resized, offloaded, and cases without a snapshot --------------------------------


def test_a_resize_and_an_offload_leave_their_segments(tmp_path: Path) -> None:
    with HostMeter(snapshot_dir=str(tmp_path)) as meter:
        meter.snapshot_label = "resized"
        t = torch.empty(16, dtype=torch.uint8)
        t.untyped_storage().resize_(1000)
        state = torch.empty(256, dtype=torch.uint8)
        meter.offloaded([state])  # offloaded optimizer state: host memory from now on
        del t
    assert meter.snapshot_path is not None and "resized-" in meter.snapshot_path
    snapshot = _load(meter.snapshot_path)
    read_with_torch(snapshot)
    events = [(e["action"], e["size"]) for e in snapshot["device_traces"][0]]
    assert events == [
        ("segment_alloc", 512),
        ("alloc", 16),
        ("free_requested", 16),
        ("free_completed", 16),
        ("segment_free", 512),
        ("segment_alloc", 1024),
        ("alloc", 1000),
        ("segment_alloc", 512),
        ("alloc", 256),
        ("free_requested", 256),
        ("free_completed", 256),
        ("segment_free", 512),
        ("free_requested", 1000),
        ("free_completed", 1000),
        ("segment_free", 1024),
    ]
    assert snapshot["segments"] == []


@pytest.mark.parametrize("collecting", [True, False])
def test_writing_leaves_the_garbage_collector_as_it_found_it(
    host_case: Case, tmp_path: Path, collecting: bool
) -> None:
    """The collector is off while a snapshot's dicts are made, and back as it was after."""
    log = host_case[1]
    path = tmp_path / "snapshot.pickle"
    (gc.enable if collecting else gc.disable)()
    try:
        write_snapshot(log, str(path))
        assert gc.isenabled() is collecting
    finally:
        gc.enable()
    assert _load(path) == snapshot_of(log)


def test_a_meter_without_a_snapshot_dir_writes_none() -> None:
    with HostMeter() as meter:
        torch.ones(8)
    assert meter.snapshot_path is None and not meter.ledger.events.frames
    assert FakeMeter().snapshot_path is None


def test_a_case_that_raised_writes_no_snapshot(tmp_path: Path) -> None:
    meter = HostMeter(snapshot_dir=str(tmp_path / "snaps"))
    with pytest.raises(RuntimeError, match="boom"), meter:
        torch.ones(8)
        raise RuntimeError("boom")
    assert meter.snapshot_path is None
    assert not (tmp_path / "snaps").exists()


# -- through the plugin -------------------------------------------------------------------------

TWO_CASES = f"""
import pytest

@pytest.mark.vram_budget(gb=0.001)
def test_over(vram):
    vram.step({SMALL})

@pytest.mark.vram_budget(gb=1)
def test_fits(vram):
    vram.step(model="tiny-llama", batch=2, seq=32)
"""


def _kept(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pickle"))


def test_a_failing_host_case_keeps_a_snapshot_memory_viz_reads(vram_project: Any) -> None:
    vram_project.write(TWO_CASES)
    result = vram_project.run("--vram-update")
    result.assert_outcomes(failed=1, passed=1)
    (kept,) = _kept(vram_project.path)
    assert kept.parent == vram_project.path / ".vram-report" / "snapshots"
    assert kept.name.startswith(LABEL.replace(" ", "-") + "-")
    assert (
        f"memory snapshot of [{LABEL}]: {kept} (open it in https://pytorch.org/memory_viz)"
        in output(result)
    )
    assert re.search(rf"peak .* exceeds budget .*\[{re.escape(LABEL)}\]", output(result))
    snapshot = _load(kept)
    read_with_torch(snapshot)
    # The peak the budget failed, read from the trace over the steps (their phases' clock).
    first_step = next(
        n["time_us"] for n in snapshot["external_annotations"] if n["name"].startswith("forward")
    )
    live = live_after_each(snapshot)
    in_steps = [[b for t, b in live if t <= first_step][-1]] + [
        b for t, b in live if t > first_step
    ]
    assert max(in_steps) == vram_project.entry("test_over")["peak_bytes"]


def test_with_all_a_passing_case_keeps_one_too(vram_project: Any) -> None:
    vram_project.write(TWO_CASES)
    result = vram_project.run("--vram-update", "--vram-snapshots=all")
    assert len(_kept(vram_project.path)) == 2
    result.assert_outcomes(failed=1, passed=1)


def test_none_records_no_snapshot(vram_project: Any) -> None:
    vram_project.write(TWO_CASES)
    result = vram_project.run("--vram-update", "--vram-snapshots=none")
    result.assert_outcomes(failed=1, passed=1)
    assert _kept(vram_project.path) == []
    assert "memory snapshot of" not in output(result)
