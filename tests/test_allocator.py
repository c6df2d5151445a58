"""The caching allocator simulation against PyTorch's rules (c10/cuda/CUDACachingAllocator.cpp,
torch 2.13), with hand-worked sequences: each test's comments carry the arithmetic. Sizes in
MiB are 2**20 bytes. Then its config parser against torch's own. Random sequences, event logs
and torch's own stats are in test_allocator_sequences.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Final

import pytest

from pytest_vram.allocator import (
    AllocatorConfig,
    AllocatorConfigError,
    CachingAllocator,
    SimulatedOutOfMemory,
)
from pytest_vram.allocator.config import round_size
from pytest_vram.errors import is_oom

MiB: Final = 2**20


def make(config: str = "", capacity: int | None = None) -> CachingAllocator:
    return CachingAllocator(AllocatorConfig.parse(config), capacity)


def blocks(sim: CachingAllocator) -> list[list[tuple[int, bool]]]:
    """Each segment's blocks as (size, allocated), segments by address."""
    return [[(size, used) for size, used, _ in seg.blocks] for seg in sim.segments()]


# -- the default config: pools, segment sizes, rounding, splitting, merging ----------------------


def test_small_allocations_are_packed_into_one_2mib_segment() -> None:
    sim = make()
    sim.malloc(1, 1000)  # round_size: 1000 -> 1024 (2 x 512); small pool (<= 1 MiB)
    sim.malloc(2, 3000)  # -> 3072 (6 x 512)
    sim.malloc(3, 100)  # -> 512, kMinBlockSize
    # The first request found no cached block: one 2 MiB segment (kSmallBuffer), split each
    # time since the rest is >= 512 B: 2097152 - 1024 - 3072 - 512 = 2092544 B left cached.
    assert blocks(sim) == [[(1024, True), (3072, True), (512, True), (2092544, False)]]
    assert (sim.requested_bytes, sim.allocated_bytes, sim.reserved_bytes) == (4100, 4608, 2 * MiB)
    assert sim.segment_count == 1


def test_a_1_5mib_request_makes_a_20mib_segment_that_the_next_one_reuses() -> None:
    sim = make()
    sim.malloc(1, 1536 * 1024)  # 1.5 MiB: large pool (> 1 MiB), < 10 MiB -> a 20 MiB segment
    # split: the rest, 20 - 1.5 = 18.5 MiB, is more than 1 MiB (kSmallSize)
    assert blocks(sim) == [[(1536 * 1024, True), (18944 * 1024, False)]]
    sim.malloc(2, 1536 * 1024)  # best fit: the 18.5 MiB block, split again; no new segment
    assert blocks(sim) == [[(1536 * 1024, True), (1536 * 1024, True), (17408 * 1024, False)]]
    assert (sim.allocated_bytes, sim.reserved_bytes) == (3 * MiB, 20 * MiB)


def test_a_request_over_10mib_gets_a_segment_rounded_up_to_2mib() -> None:
    sim = make()
    sim.malloc(1, 10 * MiB + 1)  # round_size: 10485761 -> 10486272 (next multiple of 512)
    # get_allocation_size: >= kMinLargeAlloc (10 MiB), so rounded up to kRoundLarge (2 MiB):
    # 12 MiB; the rest, 12582912 - 10486272 = 2096640 B, is > 1 MiB: split off and cached.
    assert blocks(sim) == [[(10486272, True), (2096640, False)]]
    assert (sim.requested_bytes, sim.allocated_bytes) == (10 * MiB + 1, 10486272)
    assert sim.reserved_bytes == 12 * MiB
    sim.malloc(2, 10 * MiB)  # exactly 10 MiB: a 10 MiB segment, nothing left to split
    assert sim.reserved_bytes == 22 * MiB


def test_a_rest_too_small_to_split_stays_in_the_allocated_block() -> None:
    sim = make()
    sim.malloc(1, 9 * MiB)  # a 20 MiB segment: 9 MiB allocated, 11 MiB cached
    sim.malloc(2, 10 * MiB + 512 * 1024)  # 10.5 MiB from the 11 MiB block: rest 0.5 MiB is not
    # > 1 MiB, so not split: the block handed out is all 11 MiB (allocated counts 9 + 11).
    assert blocks(sim) == [[(9 * MiB, True), (11 * MiB, True)]]
    assert (sim.requested_bytes, sim.allocated_bytes) == (19 * MiB + 512 * 1024, 20 * MiB)


def test_freed_neighbours_merge_and_reserved_stays_cached() -> None:
    sim = make()
    for key in (1, 2, 3):
        sim.malloc(key, 1024)  # three 1 KiB blocks in a 2 MiB segment, 2094080 B after them
    sim.free(2)  # between two allocated blocks: cached as it is
    assert blocks(sim) == [[(1024, True), (1024, False), (1024, True), (2094080, False)]]
    sim.free(1)  # merges with the free block after it: 2 KiB
    assert blocks(sim) == [[(2048, False), (1024, True), (2094080, False)]]
    sim.free(3)  # merges with both neighbours: the segment is one free 2 MiB block again
    assert blocks(sim) == [[(2 * MiB, False)]]
    assert (sim.allocated_bytes, sim.reserved_bytes, sim.max_allocated_bytes) == (0, 2 * MiB, 3072)
    sim.empty_cache()  # release_cached_blocks: an unsplit cached segment goes back
    assert (sim.reserved_bytes, sim.segments()) == (0, [])


def test_best_fit_takes_the_smallest_cached_block_that_fits() -> None:
    sim = make()
    # One 20 MiB segment cut into A 4 | X 2 | B 6 | Y 2 | 6 MiB cached (each split off the
    # cached rest: 16, 14, 8, 6 MiB).
    for key, mib in enumerate((4, 2, 6, 2)):  # A, X, B, Y
        sim.malloc(key, mib * MiB)
    sim.free(0)
    sim.free(2)  # cached now: 4 MiB (A's), 6 MiB (B's), 6 MiB (the end)
    sim.malloc(10, 3584 * 1024)  # 3.5 MiB: the 4 MiB block is the smallest that fits; its rest,
    # 0.5 MiB, is not > 1 MiB, so the whole 4 MiB is handed out
    sim.malloc(11, 5 * MiB)  # two 6 MiB blocks: the lower address (B's) wins the tie; the rest,
    # 1 MiB, is not > 1 MiB either
    assert blocks(sim) == [[(4 * MiB, True), (2 * MiB, True), (6 * MiB, True), (2 * MiB, True), (6 * MiB, False)]]  # fmt: skip
    assert (sim.allocated_bytes, sim.reserved_bytes) == (14 * MiB, 20 * MiB)


# -- max_split_size_mb -------------------------------------------------------------------------


def test_max_split_size_stops_splitting_and_bounds_the_reuse_of_oversize_blocks() -> None:
    sim = make("max_split_size_mb:40")  # blocks of 40 MiB or more are "oversize"
    sim.malloc(1, 64 * MiB)  # a 64 MiB segment; 64 >= 40: not split
    sim.free(1)  # a 64 MiB oversize block cached
    sim.malloc(2, 42 * MiB)  # get_free_block: 42 >= 40, but 64 >= 42 + 20 (max_non_split_
    # rounding, kLargeBuffer): the cached block is refused and a 42 MiB segment made
    assert sim.reserved_bytes == (64 + 42) * MiB
    sim.malloc(3, 45 * MiB)  # 64 < 45 + 20: the whole 64 MiB block serves 45 MiB, unsplit
    assert blocks(sim) == [[(64 * MiB, True)], [(42 * MiB, True)]]
    assert (sim.requested_bytes, sim.allocated_bytes) == (87 * MiB, 106 * MiB)
    sim.free(3)
    sim.malloc(4, 25 * MiB)  # 25 < 40: an oversize block never serves a smaller request, so a
    # new segment, 25 MiB rounded up to 26 MiB; the 1 MiB rest is not > 1 MiB: not split
    assert (sim.allocated_bytes, sim.reserved_bytes) == (68 * MiB, 132 * MiB)


def test_without_max_split_size_the_same_sequence_splits() -> None:
    sim = make()
    sim.malloc(1, 64 * MiB)
    sim.free(1)
    sim.malloc(2, 42 * MiB)  # the 64 MiB block is split: 42 allocated, 22 cached
    sim.malloc(3, 45 * MiB)  # nothing cached fits: a new 46 MiB segment (45 rounded up to 2
    # MiB), its 1 MiB rest is not > 1 MiB: the block is the whole 46 MiB
    assert blocks(sim) == [[(42 * MiB, True), (22 * MiB, False)], [(46 * MiB, True)]]
    assert sim.reserved_bytes == 110 * MiB


# -- expandable_segments -----------------------------------------------------------------------

GROWING: Final = (10, 12, 14, 16, 30, 8, 4)  # MiB, each freed before the next


def grow_and_shrink(config: str) -> CachingAllocator:
    sim = make(config)
    for key, mib in enumerate(GROWING):
        sim.malloc(key, mib * MiB)
        sim.free(key)
    return sim


def test_expandable_segments_reserve_less_for_a_growing_then_shrinking_sequence() -> None:
    # Classic segments: each request larger than every cached block makes its own segment,
    # 10 + 12 + 14 + 16 + 30 = 82 MiB; 8 and 4 MiB are then served by the cached 10 MiB block.
    assert grow_and_shrink("").max_reserved_bytes == 82 * MiB
    # Expandable: one segment mapped 20 MiB page by 20 MiB page (large_segment_size). 10 MiB
    # maps one page; 12, 14 and 16 MiB fit in it once freed; 30 MiB maps a second page and
    # takes the free 20 MiB before it: 40 MiB.
    sim = grow_and_shrink("expandable_segments:True")
    assert sim.max_reserved_bytes == sim.reserved_bytes == 40 * MiB
    (segment,) = sim.segments()
    assert segment.expandable and segment.blocks == ((40 * MiB, False, 0),)
    sim.empty_cache()  # unmap_block: every whole free page goes back
    assert (sim.reserved_bytes, sim.segments()) == (0, [])


def test_expandable_segments_map_2mib_pages_for_the_small_pool() -> None:
    sim = make("expandable_segments:True")
    sim.malloc(1, 100)  # 512 B: one 2 MiB page of the small pool's segment
    sim.malloc(2, 1536 * 1024)  # 1.5 MiB: one 20 MiB page of the large pool's segment
    sim.malloc(3, 21 * MiB)  # 21 MiB more, after the 1.5: 22.5 MiB needs a second page
    assert sim.reserved_bytes == (2 + 20 + 20) * MiB
    # should_split with expandable segments: a rest of 512 B or more is split off
    assert [len(seg.blocks) for seg in sim.segments()] == [2, 3]


def test_expandable_best_fit_leaves_the_growing_end_for_last() -> None:
    sim = make("expandable_segments:True")
    sim.malloc(1, 8 * MiB)  # page 1 (20 MiB): A 8 | B 6 | 6 MiB free at the mapped end
    sim.malloc(2, 6 * MiB)
    sim.free(1)
    sim.malloc(3, 5 * MiB)  # the end's 6 MiB is the smallest fit, but it can grow into the
    # unmapped rest: get_free_block takes A's 8 MiB block, which cannot (5 | 3 free)
    assert blocks(sim) == [[(5 * MiB, True), (3 * MiB, False), (6 * MiB, True), (6 * MiB, False)]]  # fmt: skip


# -- roundup_power2_divisions ------------------------------------------------------------------


def test_roundup_power2_divisions_rounds_to_a_division_of_the_power_of_two() -> None:
    four = AllocatorConfig.parse("roundup_power2_divisions:4")
    # 1300000 B lies in [1 MiB, 2 MiB); 4 divisions are 256 KiB apart: 1 MiB + 256 KiB
    assert round_size(1300000, four) == 1310720
    assert round_size(1300000, AllocatorConfig()) == 1300480  # 2540 x 512
    assert round_size(1536, four) == 1536  # only sizes above 512 x divisions (2048 B) round so
    assert round_size(4096, four) == 4096  # a power of two stays
    # Per interval: [64:8, 256:4, >:1] -> 8 up to the 64 MiB interval, 0 (none) for 128 MiB
    # (no boundary given), 4 for 256 MiB, 1 (none) above.
    listed = AllocatorConfig.parse("roundup_power2_divisions:[64:8,256:4,>:1]")
    assert listed.roundup_power2_divisions == (8,) * 7 + (0, 4) + (1,) * 7
    rounded = [round_size(mib * MiB, listed) // MiB for mib in (100, 200, 300, 600)]
    assert rounded == [104, 200, 320, 600]  # 64 + 5 x 8; unrounded; 256 + 64; unrounded


# -- running out of a device -------------------------------------------------------------------


def test_a_full_device_releases_the_cache_and_retries_then_runs_out() -> None:
    sim = make(capacity=40 * MiB)
    sim.malloc(1, 30 * MiB)
    sim.free(1)  # 30 MiB cached
    sim.malloc(2, 32 * MiB)  # 30 + 32 > 40: cudaMalloc fails; release_cached_blocks frees the
    # cached 30 MiB segment and the retry succeeds
    assert (sim.reserved_bytes, sim.num_alloc_retries) == (32 * MiB, 1)
    with pytest.raises(SimulatedOutOfMemory) as caught:
        sim.malloc(3, 16 * MiB)  # 32 + 16 > 40 and nothing cached to release
    error = caught.value
    assert (error.requested, error.alloc_size, error.reserved, error.capacity) == (16 * MiB, 16 * MiB, 32 * MiB, 40 * MiB)  # fmt: skip
    assert is_oom(error) and "16.00 MiB" in str(error) and "40.00 MiB" in str(error)
    assert (sim.num_ooms, sim.allocated_bytes) == (1, 32 * MiB)


def test_max_split_size_releases_only_an_oversize_block_when_full() -> None:
    sim = make("max_split_size_mb:40", capacity=100 * MiB)
    sim.malloc(1, 50 * MiB)  # oversize segment
    sim.malloc(2, 30 * MiB)
    sim.free(1)  # 50 MiB oversize cached, 80 MiB reserved
    sim.malloc(3, 25 * MiB)  # the oversize block serves no smaller request; 80 + 26 > 100:
    # release_available_cached_blocks frees the 50 MiB block alone, no full release
    assert (sim.reserved_bytes, sim.num_alloc_retries) == ((30 + 26) * MiB, 0)


def test_throw_on_cudamalloc_oom_rejects_without_releasing_the_cache() -> None:
    sim = make("throw_on_cudamalloc_oom:True", capacity=40 * MiB)
    sim.malloc(1, 30 * MiB)
    sim.free(1)
    with pytest.raises(SimulatedOutOfMemory):
        sim.malloc(2, 32 * MiB)  # would fit after a release, but alloc_block rejects up front
    assert sim.reserved_bytes == 30 * MiB


def test_garbage_collection_frees_old_cached_blocks_over_the_threshold() -> None:
    # Allowed: 0.5 x 100 MiB = 50 MiB; collection above 0.5 x 50 = 25 MiB reserved.
    config = "per_process_memory_fraction:0.5,garbage_collection_threshold:0.5"
    for text, reserved in ((config, 22 * MiB), ("per_process_memory_fraction:0.5", 50 * MiB)):
        sim = make(text, capacity=100 * MiB)
        sim.malloc(1, 16 * MiB)
        sim.malloc(2, 12 * MiB)
        sim.free(1)
        sim.free(2)  # 16 + 12 = 28 MiB cached
        sim.malloc(3, 22 * MiB)  # no cached block fits. With collection: 28 > 25, both cached
        # blocks are as old as the average and go back: 22 MiB. Without: 28 + 22 = 50 fits.
        assert sim.reserved_bytes == reserved, text


# -- the config string -------------------------------------------------------------------------


def test_a_config_is_read_as_torch_reads_it() -> None:
    config = AllocatorConfig.parse(
        " max_split_size_mb : 128 , expandable_segments:True, large_segment_size_mb:32,"
        "garbage_collection_threshold:0.6,backend:native,pinned_use_cuda_host_register:False"
    )
    assert (config.max_split_size, config.large_segment_size) == (128 * MiB, 32 * MiB)
    # max_non_split_rounding follows large_segment_size unless given
    assert config.max_non_split_rounding_size == 32 * MiB
    assert config.expandable_segments and config.garbage_collection_threshold == 0.6
    assert AllocatorConfig.parse("") == AllocatorConfig()
    env = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:32"}  # fmt: skip
    assert AllocatorConfig.from_env(env).max_split_size == 32 * MiB  # the CUDA name first


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_split_size_mb:10", "max_split_size_mb"),  # below large_segment_size (20)
        ("large_segment_size_mb:40,max_split_size_mb:30", "max_split_size_mb"),
        ("max_non_split_rounding_mb:8", "max_non_split_rounding_mb"),
        ("large_segment_size_mb:10", "large_segment_size_mb"),  # must be > 10
        ("expandable_segments:true", "expandable_segments"),  # exactly True or False
        ("roundup_power2_divisions:3", "roundup_power2_divisions"),
        ("roundup_power2_divisions:[63:2]", "roundup_power2_divisions"),
        ("roundup_power2_divisions:[64:8", "roundup_power2_divisions"),
        ("garbage_collection_threshold:1.0", "garbage_collection_threshold"),
        ("per_process_memory_fraction:1.5", "per_process_memory_fraction"),
        ("max_split_size_mb:abc", "max_split_size_mb"),
        ("max_split_size_mb", "max_split_size_mb"),
        ("max_split_size_mb:64,maxsplit:3", "maxsplit"),
        ("backend:cudaMallocAsync", "backend"),  # another allocator: not simulated
        ("pinned_num_register_threads:3", "pinned_num_register_threads"),
    ],
)
def test_a_bad_config_raises_a_value_error_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(AllocatorConfigError, match=f"{key}: ") as caught:
        AllocatorConfig.parse(text)
    assert isinstance(caught.value, ValueError) and repr(text) in str(caught.value)


# Settings read by AcceleratorAllocatorConfig, which every torch build has: this one's parser
# accepts and refuses as ours does. Each is parsed after large_segment_size_mb:20, since torch
# keeps that setting from one parse to the next.
PARITY: Final = (
    "",
    "max_split_size_mb:20",
    "max_split_size_mb:19",
    "max_split_size_mb:30,",
    "max_split_size_mb:20MB",
    "large_segment_size_mb:40,max_split_size_mb:30",
    "max_split_size_mb:40,large_segment_size_mb:40",
    "large_segment_size_mb:10",
    "max_non_split_rounding_mb:19",
    "garbage_collection_threshold:0",
    "garbage_collection_threshold:0.6",
    "roundup_power2_divisions:0",
    "roundup_power2_divisions:[64:8,256:4,>:1]",
    "roundup_power2_divisions:[64:3]",
    "roundup_power2_divisions:[>:2]",
    "roundup_power2_divisions:[64:8",
    " expandable_segments : True ",
    "expandable_segments:1",
    "expandable_segments",
    "max_split_size_mb;30",
    "max_split_size_mb:30,,",
    "pinned_use_background_threads:yes",
)
_TORCH_PARSES: Final = """
import json, sys, torch
if not hasattr(torch._C, "_accelerator_setAllocatorSettings"):
    print("null")  # torch before AcceleratorAllocatorConfig
    sys.exit()
ok = []
for text in json.loads(sys.argv[1]):
    torch._C._accelerator_setAllocatorSettings("large_segment_size_mb:20")
    try:
        torch._C._accelerator_setAllocatorSettings(text)
        ok.append(True)
    except (RuntimeError, ValueError):
        ok.append(False)
print(json.dumps(ok))
"""


def test_the_config_parser_accepts_and_refuses_what_torch_does() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _TORCH_PARSES, json.dumps(PARITY)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    torch_ok = json.loads(run.stdout.splitlines()[-1])
    if torch_ok is None:
        pytest.skip("this torch has no torch._C._accelerator_setAllocatorSettings")

    def ours(text: str) -> bool:
        try:
            AllocatorConfig.parse(text)
        except AllocatorConfigError:
            return False
        return True

    assert {t: ours(t) for t in PARITY} == dict(zip(PARITY, torch_ok, strict=True))
