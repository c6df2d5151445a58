"""The caching allocator simulation on sequences: its counters' invariants on random
sequences, a meter's event log replayed (resizes, per-step windows, a traced step), and (under
--gpu) torch's own stats for the same sequence. The hand-worked rules are in test_allocator.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_allocator import MiB, make

from pytest_vram.allocator import (
    ALLOC,
    FREE,
    AllocatorConfig,
    CachingAllocator,
    SimulatedOutOfMemory,
    events_of,
    simulate,
    step_starts,
)

# -- invariants on random sequences ------------------------------------------------------------

SIZES: Final = st.one_of(
    st.integers(0, 4096),
    st.integers(1, 2 * MiB),
    st.integers(MiB, 12 * MiB),
    st.integers(10 * MiB, 90 * MiB),
)
CONFIGS: Final = st.sampled_from(
    [
        "",
        "expandable_segments:True",
        "max_split_size_mb:40",
        "max_split_size_mb:20,max_non_split_rounding_mb:30",
        "roundup_power2_divisions:[1:2,8:4,>:8]",
        "expandable_segments:True,large_segment_size_mb:12",
    ]
)
OPS: Final = st.lists(st.tuples(st.booleans(), SIZES, st.integers(0, 99)), max_size=60)


def consistent(sim: CachingAllocator, live: dict[int, int]) -> None:
    segments = sim.segments()
    assert sim.requested_bytes == sum(live.values())
    assert sim.reserved_bytes >= sim.allocated_bytes >= sim.requested_bytes
    assert sim.reserved_bytes == sum(s.total_size for s in segments)
    assert sim.allocated_bytes == sum(s.allocated_size for s in segments)
    assert sim.max_reserved_bytes >= sim.reserved_bytes
    assert sim.max_allocated_bytes >= sim.allocated_bytes


@settings(max_examples=150, deadline=None)
@given(config=CONFIGS, ops=OPS)
def test_random_sequences_keep_the_counters_consistent(config: str, ops: list[tuple[bool, int, int]]) -> None:  # fmt: skip
    sim = make(config)
    live: dict[int, int] = {}
    peak_allocated = peak_reserved = 0
    for key, (alloc, size, pick) in enumerate(ops):
        reserved = sim.reserved_bytes
        if alloc or not live:
            sim.malloc(key, size)
            live[key] = size
        else:
            sim.free(victim := sorted(live)[pick % len(live)])
            del live[victim]
            assert sim.reserved_bytes == reserved  # a freed block stays cached
        consistent(sim, live)
        assert sim.max_allocated_bytes >= peak_allocated  # peaks never go down
        assert sim.max_reserved_bytes >= peak_reserved
        peak_allocated, peak_reserved = sim.max_allocated_bytes, sim.max_reserved_bytes
    for key in list(live):
        sim.free(key)
    consistent(sim, {})
    assert sim.allocated_bytes == 0
    sim.empty_cache()  # every segment merged back into one free block and given back
    assert sim.reserved_bytes == 0


@settings(max_examples=100, deadline=None)
@given(config=CONFIGS, ops=OPS, capacity=st.integers(4, 200))
def test_a_device_never_holds_more_than_its_capacity(config: str, ops: list[tuple[bool, int, int]], capacity: int) -> None:  # fmt: skip
    sim = make(config, capacity * MiB)
    live: dict[int, int] = {}
    for key, (alloc, size, pick) in enumerate(ops):
        if alloc or not live:
            try:
                sim.malloc(key, size)
                live[key] = size
            except SimulatedOutOfMemory as error:
                assert (error.requested, error.capacity) == (size, capacity * MiB)
        else:
            sim.free(victim := sorted(live)[pick % len(live)])
            del live[victim]
        assert sim.max_reserved_bytes <= capacity * MiB
        consistent(sim, live)


# -- a meter's event log -----------------------------------------------------------------------


def test_events_of_keys_each_allocation_and_replays_a_resize_alloc_first() -> None:
    from pytest_vram.meters.events import EventLog  # the log the host and fake meters keep
    from pytest_vram.timeline import Phase

    log = EventLog()
    # storage 7: 100 B; storage 8: 200 B resized to 300 B (logged as a free then an alloc)
    for op, (kind, sid, nbytes) in enumerate(
        [
            (ALLOC, 7, 100),
            (ALLOC, 8, 200),
            (FREE, 8, 200),
            (ALLOC, 8, 300),
            (FREE, 7, 100),
            (FREE, 8, 300),
        ]  # fmt: skip
    ):
        log.ops = op
        log.add(kind, sid, nbytes, 0)
    events = list(events_of(log))
    # keys are the ALLOC events' indices; the resize allocates 300 B before freeing 200 B
    assert events == [(ALLOC, 0, 100), (ALLOC, 1, 200), (ALLOC, 3, 300), (FREE, 1, 200), (FREE, 0, 100), (FREE, 3, 300)]  # fmt: skip
    prediction = simulate(events)
    assert prediction.max_requested_bytes == 600  # 100 + 200 + 300 during the resize
    log.phases = [Phase(0, "setup", 0), Phase(2, "forward", 1), Phase(4, "optimizer", 1), Phase(5, "forward", 2)]  # fmt: skip
    assert step_starts(log) == [(0, 0), (1, 2), (2, 5)]


def test_windows_report_the_peaks_of_each_step() -> None:
    events = [(ALLOC, 1, 3 * MiB), (FREE, 1, 3 * MiB), (ALLOC, 2, MiB), (ALLOC, 3, 512), (FREE, 2, MiB)]  # fmt: skip
    prediction = simulate(events, windows=[0, 2])
    # window 0: 3 MiB in a 20 MiB segment; window 1: 1 MiB (small pool, a 2 MiB segment) and
    # 512 B beside it; reserved starts the window at 20 MiB, and ends at 22
    first, second = prediction.windows
    assert (first.max_allocated_bytes, first.max_reserved_bytes) == (3 * MiB, 20 * MiB)
    assert (second.max_allocated_bytes, second.max_reserved_bytes) == (MiB + 512, 22 * MiB)
    assert (prediction.max_allocated_bytes, prediction.max_reserved_bytes) == (3 * MiB, 22 * MiB)
    assert (prediction.end_allocated_bytes, prediction.end_reserved_bytes) == (512, 22 * MiB)


def test_a_traced_step_predicts_reserved_above_allocated_above_the_meter_peak() -> None:
    from pytest_vram.meters.host import HostMeter
    from pytest_vram.spec import StepSpec
    from pytest_vram.step import run_step

    meter = HostMeter()
    run_step(StepSpec(model="tiny-llama", method="lora", batch=2, seq=64), meter)
    log, peak = meter.ledger.events, meter.ledger.peak_bytes
    windows = [start for _, start in step_starts(log)]
    for config in ("", "expandable_segments:True", "roundup_power2_divisions:4"):
        p = simulate(events_of(log), AllocatorConfig.parse(config), windows=windows)
        print(
            f"tiny-llama lora b2 s64 [{config or 'default'}]: {len(log)} events, storage peak "
            f"{peak} B, simulated requested {p.max_requested_bytes}, allocated "
            f"{p.max_allocated_bytes}, reserved {p.max_reserved_bytes} B"
        )
        assert p.max_reserved_bytes >= p.max_allocated_bytes >= p.max_requested_bytes >= peak
        assert p.max_reserved_bytes <= 2 * peak  # small tensors: 2 MiB segments, packed
        assert max(w.max_reserved_bytes for w in p.windows) == p.max_reserved_bytes


# -- torch's own allocator ---------------------------------------------------------------------

_REPLAY: Final = """
import json, sys, torch
events, live = json.loads(sys.argv[1]), {}
for kind, key, nbytes in events:
    if kind == 0:
        live[key] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    else:
        del live[key]
stats = torch.cuda.memory_stats()
expandable = any(s.get("is_expandable") for s in torch.cuda.memory_snapshot())
print(json.dumps({"reserved": stats["reserved_bytes.all.peak"], "allocated": stats["allocated_bytes.all.peak"], "requested": stats["requested_bytes.all.peak"], "expandable": expandable}))
"""


def replay_sequence(seed: int, count: int = 300) -> list[tuple[int, int, int]]:
    """Allocations of every pool's sizes, each freed later at random."""
    rng = random.Random(seed)
    live: dict[int, int] = {}
    events = []
    for key in range(count):
        if live and rng.random() < 0.5:
            victim = rng.choice(sorted(live))
            events.append((FREE, victim, live.pop(victim)))
        band = rng.choice([4096, MiB, 12 * MiB, 64 * MiB])
        live[key] = rng.randint(1, band)
        events.append((ALLOC, key, live[key]))
    return events


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config", ["", "max_split_size_mb:32", "expandable_segments:True", "roundup_power2_divisions:4"]
)
def test_the_simulation_matches_torch_on_a_gpu(config: str) -> None:
    events = replay_sequence(seed=16)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": config}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_REPLAY), json.dumps(events)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=env,
    )
    measured = json.loads(run.stdout.splitlines()[-1])
    if config.startswith("expandable") and not measured["expandable"]:
        pytest.skip("expandable segments are not supported on this platform")
    predicted = simulate(events, AllocatorConfig.parse(config))
    print(f"[{config or 'default'}] torch {measured}, simulated {predicted}")
    assert measured["requested"] == predicted.max_requested_bytes
    assert measured["allocated"] == predicted.max_allocated_bytes
    assert measured["reserved"] == predicted.max_reserved_bytes
