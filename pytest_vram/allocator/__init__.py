"""PyTorch's CUDA caching allocator, simulated over a traced sequence of allocations and frees,
to predict ``torch.cuda.max_memory_reserved`` (what a GPU user budgets) and
``max_memory_allocated`` without a GPU.

Torch-free. It follows the native backend of torch 2.13, ``c10/cuda/CUDACachingAllocator.cpp``
(``caching.py``, each rule citing its C++ function), with ``PYTORCH_CUDA_ALLOC_CONF`` read as
``c10/core/AllocatorConfig.cpp`` reads it (``config.py``). Three byte counts, named as
``torch.cuda.memory_stats`` names them:

* requested: the bytes asked for, a storage's nbytes: what the host and fake meters count;
* allocated (``memory_allocated``): the blocks handed out. A block is the request rounded up
  (``round_size``: to a multiple of 512 B, or further under ``roundup_power2_divisions``), or a
  whole cached block when what is left would be too small to split off (under 512 B in the
  small pool, up to 1 MiB in the large one), or a whole oversize block (``max_split_size_mb``);
* reserved (``memory_reserved``): the segments held from the driver, cudaMalloc'd (2 MiB for
  requests up to 1 MiB, 20 MiB below 10 MiB, else the request rounded up to 2 MiB) or, with
  ``expandable_segments:True``, the pages mapped into one growing segment per pool; a freed
  block stays cached in its segment until a cudaMalloc fails or ``empty_cache``.

Modelled: the small and large pools, best fit, splitting and merging, max_split_size_mb and
max_non_split_rounding_mb, roundup_power2_divisions, large_segment_size_mb, expandable
segments (mapping, and unmapping on release), and running out of a ``capacity_bytes`` device
(releasing cached blocks and retrying as malloc does, then ``SimulatedOutOfMemory``), with
per_process_memory_fraction, garbage_collection_threshold and throw_on_cudamalloc_oom. Left
out: more than one stream (a block used on another stream is freed at once here), CUDA graphs
and private pools (``MemPool``), IPC, the free-memory callbacks, and ``empty_cache`` calls
other than malloc's own.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol, final

from pytest_vram.allocator.blocks import SegmentInfo
from pytest_vram.allocator.caching import CachingAllocator, SimulatedOutOfMemory
from pytest_vram.allocator.config import AllocatorConfig, AllocatorConfigError

__all__ = [
    "ALLOC",
    "FREE",
    "Replay",
    "AllocatorConfig",
    "AllocatorConfigError",
    "AllocatorPrediction",
    "CachingAllocator",
    "SegmentInfo",
    "SimulatedOutOfMemory",
    "WindowPeaks",
    "events_of",
    "simulate",
    "step_starts",
]

ALLOC: Final = 0  # as meters.events.ALLOC and FREE
FREE: Final = 1
Event = tuple[int, int, int]  # (ALLOC or FREE, key of the allocation, nbytes)


@final
@dataclasses.dataclass(frozen=True)
class WindowPeaks:
    """The peaks from event ``start`` until the next window's start: peaks reset at ``start``
    as ``torch.cuda.reset_peak_memory_stats()`` at the start of a step resets them."""

    start: int
    max_requested_bytes: int
    max_allocated_bytes: int
    max_reserved_bytes: int


@final
@dataclasses.dataclass(frozen=True)
class AllocatorPrediction:
    """What the caching allocator would report for the events: ``max_reserved_bytes`` is
    ``torch.cuda.max_memory_reserved()``, ``max_allocated_bytes`` ``max_memory_allocated()``,
    ``max_requested_bytes`` the peak of live storage bytes (the host and fake meters' peak)."""

    max_requested_bytes: int
    max_allocated_bytes: int
    max_reserved_bytes: int
    end_allocated_bytes: int
    end_reserved_bytes: int
    config: str = ""  # the PYTORCH_CUDA_ALLOC_CONF simulated
    windows: tuple[WindowPeaks, ...] = ()


def simulate(
    events: Iterable[Event],
    config: AllocatorConfig | None = None,
    *,
    capacity_bytes: int | None = None,
    windows: Sequence[int] = (),
) -> AllocatorPrediction:
    """Replay ``events``, ``(ALLOC, key, nbytes)`` and ``(FREE, key, nbytes)`` in order, on a
    fresh allocator. ``windows``: indices of events where peaks are reset and a new window's
    peaks begin (``step_starts``). Raises ``SimulatedOutOfMemory`` when a ``capacity_bytes``
    device cannot hold the sequence."""
    sim = CachingAllocator(config, capacity_bytes)
    starts = sorted(set(windows))
    found: list[WindowPeaks] = []
    peaks = (0, 0, 0)

    def close() -> tuple[int, int, int]:
        now = (sim.max_requested_bytes, sim.max_allocated_bytes, sim.max_reserved_bytes)
        if found:
            found[-1] = WindowPeaks(found[-1].start, *now)
        return (max(peaks[0], now[0]), max(peaks[1], now[1]), max(peaks[2], now[2]))

    j = 0
    for index, (kind, key, nbytes) in enumerate(events):
        while j < len(starts) and starts[j] <= index:
            peaks = close()
            sim.reset_peaks()
            found.append(WindowPeaks(starts[j], 0, 0, 0))
            j += 1
        if kind == ALLOC:
            sim.malloc(key, nbytes)
        else:
            sim.free(key)
    requested, allocated, reserved = close()
    return AllocatorPrediction(
        requested,
        allocated,
        reserved,
        sim.allocated_bytes,
        sim.reserved_bytes,
        sim.config.text,
        tuple(found),
    )


class _Phase(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def step(self) -> int: ...


class _Log(Protocol):
    """What is read of a meter's ``meters.events.EventLog``."""

    @property
    def kind(self) -> Sequence[int]: ...
    @property
    def sid(self) -> Sequence[int]: ...
    @property
    def nbytes(self) -> Sequence[int]: ...
    @property
    def op(self) -> Sequence[int]: ...
    @property
    def phases(self) -> Sequence[_Phase]: ...


def events_of(log: _Log) -> Iterator[Event]:
    """A meter's event log as ``simulate`` takes it, each allocation keyed by the index of its
    ALLOC event. A resize, logged as the FREE of the old size then the ALLOC of the new one for
    the same storage, is replayed in the order torch resizes (resize_bytes_cuda): the new
    memory is allocated and copied into before the old is freed."""
    return _events(log, 0, {})


def _events(log: _Log, start: int, key_of: dict[int, int]) -> Iterator[Event]:
    """``events_of`` from event ``start`` on; ``key_of``: the key of each storage allocated
    before it, updated as the events are read."""
    kind, sid, nbytes = log.kind, log.sid, log.nbytes
    i, n = start, len(kind)
    while i < n:
        storage = sid[i]
        if kind[i] == ALLOC:
            key_of[storage] = i
            yield ALLOC, i, nbytes[i]
        elif storage not in key_of:
            raise ValueError(f"event {i}: storage {storage} is freed but was never allocated")
        elif i + 1 < n and kind[i + 1] == ALLOC and sid[i + 1] == storage:
            yield ALLOC, i + 1, nbytes[i + 1]
            yield FREE, key_of[storage], nbytes[i]
            key_of[storage] = i + 1
            i += 1
        else:
            yield FREE, key_of.pop(storage), nbytes[i]
        i += 1


@final
class Replay:
    """A growing event log replayed on one allocator: each ``feed`` replays only the events
    logged since the last one, so a meter reads each step's peaks without replaying the
    steps before it. A resize's two events are logged together, never split by a feed."""

    def __init__(self, config: AllocatorConfig | None = None) -> None:
        self.allocator = CachingAllocator(config)
        self._next = 0
        self._key_of: dict[int, int] = {}

    def feed(self, log: _Log) -> None:
        sim = self.allocator
        for kind, key, nbytes in _events(log, self._next, self._key_of):
            if kind == ALLOC:
                sim.malloc(key, nbytes)
            else:
                sim.free(key)
        self._next = len(log.kind)


def step_starts(log: _Log) -> list[tuple[int, int]]:
    """(step, index of its first event) for each step in the log's phases, setup (0) first:
    ``simulate(..., windows=[start for _, start in step_starts(log)])`` gives per-step peaks."""
    out: list[tuple[int, int]] = []
    for phase in log.phases:
        if not out or out[-1][0] != phase.step:
            out.append((phase.step, bisect_left(log.op, phase.start)))
    return out
