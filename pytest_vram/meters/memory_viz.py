"""Memory snapshots for https://pytorch.org/memory_viz from a host or fake case's event log, and
the timeline of any snapshot, a GPU case's included.

The format is what ``torch.cuda.memory._snapshot()`` returns and ``_dump_snapshot`` pickles:
``segments`` live at the end, each with its ``blocks``; ``device_traces``, one list per device
of ``segment_alloc`` / ``alloc`` / ``free_requested`` / ``free_completed`` / ``segment_free``
events with the ``frames`` that caused them; ``allocator_settings``; ``external_annotations``.
torch's readers (``torch.cuda._memory_viz``) and the web page read it.

A host or fake meter has no caching allocator, and the snapshot models none: each storage is
its own segment holding one block, allocated when the storage appears on the device and freed
when it leaves it (freed, resized, or moved to host memory as offloaded state), so nothing is
cached and no segment is fragmented. Addresses are synthetic and the same on every run: a bump
allocator gives each segment the next 512-byte boundary and never reuses an address, so an
address names one storage's life. A block's ``size`` is its bytes rounded up to 512, as the
CUDA allocator rounds; its ``requested_size`` and the events' ``size`` are the exact bytes the
meter counts (torch's trace also records requested sizes). Zero-byte storages hold no memory
and are left out. ``time_us`` is the index of the operator that caused the event: these
meters count operators, not time. The step's phases are ``external_annotations``, START and END
as torch records ``record_function`` ranges, on the same clock.

Torch-free. pytest-vram writes pickles and never loads one: unpickling can run code.
"""

from __future__ import annotations

import gc
import pickle
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pytest_vram import files
from pytest_vram.meters.events import ALLOC, EventLog
from pytest_vram.timeline import MAX_POINTS, Phase, Timeline, decimate

__all__ = [
    "snapshot_filename",
    "snapshot_of",
    "timeline_of_snapshot",
    "write_pickle",
    "write_snapshot",
]

# memory_viz's own unpickler reads protocols 2 to 4; Python 3.14 writes 5 by default.
PROTOCOL: Final = 4
ALIGNMENT: Final = 512  # the CUDA allocator's smallest block and rounding
# A segment address that looks like a device pointer; deterministic, never reused.
BASE_ADDRESS: Final = 0x7F0000000000
SMALL_SEGMENT: Final = 1 << 20  # the CUDA allocator's small pool serves requests up to 1 MiB
# Blocks that still hold their tensor's bytes at the end of a trace.
LIVE_STATES: Final = frozenset({"active_allocated", "active_pending_free"})
# torch's plumbing on the way to an operator (the disabled-dynamo wrapper around a dispatch
# mode or a library function, the ``torch.device`` mode): never the code that allocated.
_PLUMBING: Final = ("/torch/_dynamo/eval_frame.py", "/torch/_compile.py", "/torch/utils/_device.py")
# Allocator settings of torch's defaults: what a snapshot of an uncached allocator can say.
_SETTINGS: Final = {
    "PYTORCH_CUDA_ALLOC_CONF": "",
    "max_split_size": -1,
    "garbage_collection_threshold": 0.0,
    "expandable_segments": False,
    "pinned_num_register_threads": 1,
    "release_lock_on_cudamalloc": False,
    "pinned_use_cuda_host_register": False,
    "graph_capture_record_stream_reuse": False,
    "roundup_power2_divisions": {},
}

Snapshot = dict[str, Any]
FrameDicts = list[dict[str, Any]]


def snapshot_filename(label: str) -> str:
    """A file name for a case's snapshot: the label made safe, plus a unique suffix.

    ``tiny-llama lora adamw bf16 b1 s32`` -> ``tiny-llama-lora-adamw-bf16-b1-s32-1a2b3c4d.pickle``
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:80].rstrip("-.") or "snapshot"
    return f"{stem}-{uuid.uuid4().hex[:8]}.pickle"


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class _Frames:
    """The frames of each distinct stack as memory_viz dicts, built once and shared by every
    event with that stack: pickle writes a shared object once, which keeps a long trace small."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._stacks: dict[int, FrameDicts] = {}
        self._frames: dict[tuple[str, int, str], dict[str, Any]] = {}
        self._plumbing: dict[str, bool] = {}

    def of(self, index: int) -> FrameDicts:
        stack = self._log.stack[index]
        found = self._stacks.get(stack)
        if found is None:
            found = self._stacks[stack] = [
                self._frame(frame)
                for frame in self._log.frames_of(index)
                if not self._is_plumbing(frame[0])
            ]
        return found

    def _frame(self, frame: tuple[str, int, str]) -> dict[str, Any]:
        found = self._frames.get(frame)
        if found is None:
            filename, line, name = frame
            found = self._frames[frame] = {"filename": filename, "line": line, "name": name}
        return found

    def _is_plumbing(self, filename: str) -> bool:
        found = self._plumbing.get(filename)
        if found is None:
            path = filename.replace("\\", "/")
            found = self._plumbing[filename] = any(part in path for part in _PLUMBING)
        return found


def _event(action: str, addr: int, size: int, frames: FrameDicts, time_us: int) -> dict[str, Any]:
    return {
        "action": action,
        "addr": addr,
        "size": size,
        "stream": 0,
        "compile_context": "",
        "user_metadata": "",
        "frames": frames,
        "time_us": time_us,
    }


def _segment(device: int, addr: int, nbytes: int, frames: FrameDicts) -> dict[str, Any]:
    size = _rounded(nbytes)
    block = {
        "address": addr,
        "size": size,
        "requested_size": nbytes,
        "state": "active_allocated",
        "frames": frames,
    }
    return {
        "device": device,
        "address": addr,
        "total_size": size,
        "allocated_size": size,
        "active_size": size,
        "requested_size": nbytes,
        "stream": 0,
        "segment_type": "small" if nbytes <= SMALL_SEGMENT else "large",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "frames": frames,
        "blocks": [block],
    }


def _annotations(phases: Sequence[Phase], end: int, device: int) -> list[dict[str, Any]]:
    """Each phase as a START and an END annotation; a phase ends where the next begins."""
    out: list[dict[str, Any]] = []
    for i, phase in enumerate(phases):
        name = phase.name if phase.step == 0 else f"{phase.name} (step {phase.step})"
        stop = phases[i + 1].start if i + 1 < len(phases) else max(end, phase.start)
        for stage, time_us in (("START", phase.start), ("END", stop)):
            out.append({"name": name, "stage": stage, "device": device, "time_us": time_us})
    return out


def snapshot_of(log: EventLog, device: int = 0) -> Snapshot:
    """The snapshot of ``log``'s events on device ``device`` (see the module's docstring)."""
    frames = _Frames(log)
    trace: list[dict[str, Any]] = []
    live: dict[int, tuple[int, int, FrameDicts]] = {}  # storage id -> address, bytes, frames
    address = BASE_ADDRESS
    kinds, sids, sizes, ops = log.kind, log.sid, log.nbytes, log.op
    for i in range(len(log)):
        nbytes = sizes[i]
        if nbytes == 0:
            continue
        sid, time_us, stack = sids[i], ops[i], frames.of(i)
        if kinds[i] == ALLOC:
            if sid in live:
                raise ValueError(f"event {i}: storage {sid} is allocated twice without a free")
            live[sid] = (address, nbytes, stack)
            trace.append(_event("segment_alloc", address, _rounded(nbytes), stack, time_us))
            trace.append(_event("alloc", address, nbytes, stack, time_us))
            address += _rounded(nbytes)
            continue
        if sid not in live or live[sid][1] != nbytes:
            raise ValueError(f"event {i}: storage {sid} frees {nbytes} bytes it does not hold")
        addr = live.pop(sid)[0]
        trace.append(_event("free_requested", addr, nbytes, stack, time_us))
        trace.append(_event("free_completed", addr, nbytes, stack, time_us))
        trace.append(_event("segment_free", addr, _rounded(nbytes), stack, time_us))
    segments = [_segment(device, addr, n, stack) for addr, n, stack in sorted(live.values())]
    return {
        "segments": segments,
        "device_traces": [[] for _ in range(device)] + [trace],
        "allocator_settings": dict(_SETTINGS),
        "external_annotations": _annotations(log.phases, log.ops, device),
    }


def write_pickle(snapshot: Mapping[str, Any], path: str) -> None:
    """Pickle ``snapshot`` to ``path`` whole or not at all: written beside it, then renamed."""
    with files.replaced(path) as tmp, open(tmp, "xb") as f:
        pickle.dump(snapshot, f, protocol=PROTOCOL)


def write_snapshot(log: EventLog, path: str, device: int = 0) -> None:
    """``snapshot_of(log)`` pickled to ``path``, whole or not at all."""
    # A long trace's snapshot is hundreds of thousands of new dicts, each counted towards the
    # garbage collector's next pass over every object the case made (the model, its tensors):
    # those passes were most of the writing's time, and dicts of numbers and strings make no
    # cycle for them to find.
    collecting = gc.isenabled()
    gc.disable()
    try:
        write_pickle(snapshot_of(log, device), path)
    finally:
        if collecting:
            gc.enable()


def timeline_of_snapshot(
    snapshot: Mapping[str, Any],
    phases: Iterable[Phase] = (),
    device: int = 0,
    max_points: int = MAX_POINTS,
) -> Timeline:
    """Live bytes after each ``alloc`` and ``free_completed`` of device ``device``'s trace, x in
    microseconds from its first event, decimated to ``max_points``.

    Bytes are requested bytes, as the trace records them (the allocator rounds blocks up; its
    allocated counter counts the rounded sizes). What was live before the first event (a trace
    kept in a ring buffer loses its oldest events) is what the segments hold at the end less
    what the trace added. ``phases`` start on the trace's clock (``time_us``); one that starts
    before the first event starts at 0.
    """
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if 0 <= device < len(traces) else []
    times: list[int] = []
    deltas: list[int] = []
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            deltas.append(int(event["size"]))
        elif action == "free_completed":
            deltas.append(-int(event["size"]))
        else:
            continue
        times.append(int(event["time_us"]))
    at_end = sum(
        int(block.get("requested_size", block["size"]))
        for segment in snapshot.get("segments") or []
        if segment.get("device", device) == device
        for block in segment["blocks"]
        if block.get("state") in LIVE_STATES
    )
    live = at_end - sum(deltas)
    live_bytes: list[int] = []
    for delta in deltas:
        live += delta
        live_bytes.append(live)
    start = times[0] if times else 0
    x, kept = decimate([t - start for t in times], live_bytes, max_points)
    return Timeline("us", x, kept, _shifted(phases, start), events=len(live_bytes))


def _shifted(phases: Iterable[Phase], start: int) -> tuple[Phase, ...]:
    """``phases`` from ``start`` on; of several that begin by then, the last is under way."""
    out: list[Phase] = []
    for phase in phases:
        moved = Phase(max(0, phase.start - start), phase.name, phase.step)
        if out and out[-1].start >= moved.start:
            out.pop()
        out.append(moved)
    return tuple(out)
