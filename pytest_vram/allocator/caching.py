"""DeviceCachingAllocator of torch 2.13's ``c10/cuda/CUDACachingAllocator.cpp`` on one device
and one stream, torch-free: where each request is served from, what is split, merged, obtained
from and given back to the driver. Each method cites the C++ function it follows.
"""

from __future__ import annotations

from typing import Final, final

from pytest_vram.allocator.blocks import Block, Pool, Segment, SegmentInfo, merge, snapshot, splice
from pytest_vram.allocator.config import (
    K_MIN_BLOCK_SIZE,
    K_SMALL_BUFFER,
    K_SMALL_SIZE,
    SIZE_MAX,
    AllocatorConfig,
    get_allocation_size,
    round_size,
)
from pytest_vram.units import format_bytes

__all__ = ["CachingAllocator", "SimulatedOutOfMemory"]

# ExpandableSegment reserves address space for 9/8 of the device's memory. Without a capacity
# the device is taken to be this large; it shows only if a second expandable segment is made.
_DEVICE_WITHOUT_CAPACITY: Final = 1 << 40


class SimulatedOutOfMemory(MemoryError):
    """The simulated device cannot hold a request even after the cache was given back, where
    ``DeviceCachingAllocator::malloc`` raises ``torch.OutOfMemoryError``."""

    def __init__(self, requested: int, alloc_size: int, sim: CachingAllocator) -> None:
        self.requested, self.alloc_size = requested, alloc_size
        self.allocated, self.reserved = sim.allocated_bytes, sim.reserved_bytes
        self.capacity = sim.limit_bytes or 0
        super().__init__(
            f"CUDA out of memory (simulated): tried to allocate {format_bytes(alloc_size)} for "
            f"a request of {requested} bytes, with {format_bytes(self.reserved)} reserved "
            f"({format_bytes(self.allocated)} allocated) of {format_bytes(self.capacity)}"
        )


@final
class CachingAllocator:
    """``malloc(key, nbytes)`` and ``free(key)``, keyed by the caller's id of an allocation;
    the counters are torch's memory stats. ``capacity_bytes``: the device's memory, all free
    for this allocator (cudaMalloc and page mapping fail beyond it); None: never full."""

    def __init__(self, config: AllocatorConfig | None = None, capacity_bytes: int | None = None) -> None:  # fmt: skip
        self.config = cfg = config if config is not None else AllocatorConfig()
        self.capacity_bytes = capacity_bytes
        # setMemoryFraction: per_process_memory_fraction of the device is all it may reserve.
        fraction = cfg.per_process_memory_fraction
        limited = capacity_bytes is not None and fraction < 1
        self._allowed = int(fraction * capacity_bytes) if limited and capacity_bytes else None
        self._gc = self._allowed is not None and cfg.garbage_collection_threshold > 0
        self._small, self._large = Pool(True), Pool(False)
        self._live: dict[int, Block | None] = {}
        self._next_address = 1 << 32
        self.allocated_bytes = self.requested_bytes = self.reserved_bytes = 0
        self.max_allocated_bytes = self.max_requested_bytes = self.max_reserved_bytes = 0
        self.segment_count = self.num_alloc_retries = self.num_ooms = 0

    @property
    def limit_bytes(self) -> int | None:
        """What the allocator may reserve: the allowed fraction, else the capacity."""
        return self._allowed if self._allowed is not None else self.capacity_bytes

    def malloc(self, key: int, nbytes: int) -> None:
        """DeviceCachingAllocator::malloc: the rounded request from the best-fitting cached
        block, else from a new segment; alloc_found_block splits off what should_split allows."""
        if key in self._live or nbytes < 0:
            raise ValueError(f"malloc({key}, {nbytes}): key already live, or a negative size")
        if nbytes == 0:  # NativeCachingAllocator::allocate: no block for 0 bytes
            self._live[key] = None
            return
        size = round_size(nbytes, self.config)
        pool = self._small if size <= K_SMALL_SIZE else self._large
        block = self._get_free_block(pool, size) or self._new_block(pool, size, nbytes)
        if self._should_split(block, size):  # the found block's tail goes back to the pool
            rest, block = block, Block(size, block.ptr, pool, block.seg)
            splice(block, rest.prev, rest)
            rest.ptr += size
            rest.size -= size
            pool.insert(rest)
        block.allocated, block.requested = True, nbytes
        self._live[key] = block
        self.allocated_bytes += block.size  # the stat counts block->size, not the request
        self.requested_bytes += nbytes
        self.max_allocated_bytes = max(self.max_allocated_bytes, self.allocated_bytes)
        self.max_requested_bytes = max(self.max_requested_bytes, self.requested_bytes)

    def free(self, key: int) -> None:
        """DeviceCachingAllocator::free and free_block: the block is cached, merged with the
        free neighbours in its segment (try_merge_blocks); reserved bytes do not change."""
        if key not in self._live:
            raise KeyError(f"free({key}): no live allocation has this key")
        block = self._live.pop(key)
        if block is None:
            return
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        for neighbour in (block.prev, block.next):
            merge(block, neighbour)
        block.pool.insert(block)

    def empty_cache(self) -> None:
        """release_cached_blocks (torch.cuda.empty_cache, and malloc's last retry)."""
        for pool in (self._large, self._small):
            self._release_blocks(pool)

    def reset_peaks(self) -> None:
        """torch.cuda.reset_peak_memory_stats: each peak becomes the current value."""
        self.max_allocated_bytes = self.allocated_bytes
        self.max_requested_bytes = self.requested_bytes
        self.max_reserved_bytes = self.reserved_bytes

    def segments(self) -> list[SegmentInfo]:
        """DeviceCachingAllocator::snapshot: the segments by address, with their blocks."""
        cached = [b for pool in (self._small, self._large) for _, _, b in pool.free]
        return snapshot(cached + [b for b in self._live.values() if b is not None])

    # -- finding a block -------------------------------------------------------------------

    def _get_free_block(self, pool: Pool, size: int) -> Block | None:
        """get_free_block: the smallest cached block of ``size`` bytes or more."""
        cfg = self.config
        if self._gc:
            pool.calls += 1
        i = pool.at_least(size)
        if i == len(pool.free):
            return None
        block = pool.free[i][2]

        def grown(b: Block) -> int:  # what a block at the mapped end of a segment can become
            return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

        # Expandable segments: best fit by the size a block can grow to, so the segment's
        # growing end comes last. (The simulation never turns them off midway.)
        while block.seg is not None and i + 1 < len(pool.free):
            if grown(pool.free[i + 1][2]) >= grown(block):
                break
            i += 1
            block = pool.free[i][2]
        # max_split_size: an oversize block serves no smaller request, and an oversize request
        # only within max_non_split_rounding_size (20 MiB) of the block's size.
        if size < cfg.max_split_size <= block.size:
            return None
        if size >= cfg.max_split_size and block.size >= size + cfg.max_non_split_rounding_size:
            return None
        del pool.free[i]
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        """should_split: in the small pool and in expandable segments, a rest of 512 B or more
        (kMinBlockSize); in the large pool, more than 1 MiB (kSmallSize) and never an oversize
        request's block."""
        remaining = block.size - size
        if block.pool.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.config.max_split_size and remaining > K_SMALL_SIZE

    def _new_block(self, pool: Pool, size: int, nbytes: int) -> Block:
        """malloc with no cached block to serve: garbage collection if set up, alloc_block;
        failing that release_available_cached_blocks and retry, then release_cached_blocks
        (every unsplit cached segment back to the driver) and retry; then out of memory."""
        alloc_size = get_allocation_size(size, self.config)
        if self._gc:
            self._garbage_collect()
        block, rejected = self._alloc_block(pool, size, alloc_size)
        if block is None and not rejected:
            if self._release_available_cached_blocks(pool, size):
                block, _ = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self.empty_cache()
                self.num_alloc_retries += 1
                block, _ = self._alloc_block(pool, size, alloc_size)
        if block is None:
            self.num_ooms += 1
            raise SimulatedOutOfMemory(nbytes, alloc_size, self)
        return block

    # -- memory from the driver ------------------------------------------------------------

    def _fits(self, nbytes: int) -> bool:
        cap = self.capacity_bytes
        return cap is None or self.reserved_bytes + nbytes <= cap

    def _reserve(self, nbytes: int) -> None:
        self.reserved_bytes += nbytes
        self.max_reserved_bytes = max(self.max_reserved_bytes, self.reserved_bytes)

    def _address(self, size: int, align: int = K_SMALL_BUFFER) -> int:
        start = -(-self._next_address // align) * align
        self._next_address = start + size
        return start

    def _alloc_block(self, pool: Pool, size: int, alloc_size: int) -> tuple[Block | None, bool]:
        """alloc_block: a new segment of ``alloc_size`` (get_allocation_size), or with
        expandable segments pages mapped for ``size``; (None, True) when
        throw_on_cudamalloc_oom rejects it up front (malloc then skips the retries)."""
        cfg = self.config
        if self._allowed is not None and self.reserved_bytes + alloc_size > self._allowed:
            return None, False
        if cfg.throw_on_cudamalloc_oom and not self._fits(alloc_size):
            return None, True
        if cfg.expandable_segments:
            return self._allocate_expandable(pool, size), False
        if not self._fits(alloc_size):
            return None, False  # cudaMalloc fails
        self._reserve(alloc_size)
        self.segment_count += 1
        return Block(alloc_size, self._address(alloc_size), pool), False

    def _allocate_expandable(self, pool: Pool, size: int) -> Block | None:
        """try_allocate_expandable_block: pages mapped at the lowest address with room
        (find_expandable_block), merged with the free block before them."""
        block = self._find_expandable_block(pool, size)
        if not block.mapped and not self._map_block(block, min(block.size, size)):
            return None
        while block.size < size:
            after = block.next
            assert after is not None and not after.mapped
            if not self._map_block(after, min(size - block.size, after.size)):
                return None
            block = after
        pool.erase(block)
        return block

    def _find_expandable_block(self, pool: Pool, size: int) -> Block:
        """find_expandable_block: the lowest unmapped address space (with the free block just
        before it) that holds ``size``; else a new expandable segment."""

        def room(b: Block | None) -> bool:
            total = 0
            while total < size and b is not None and not b.allocated:
                total += b.size
                b = b.next
            return total >= size

        for block in sorted(pool.unmapped, key=lambda b: b.ptr):
            if block.prev is not None and not block.prev.allocated:
                block = block.prev
            if room(block):
                return block
        page = K_SMALL_BUFFER if pool.small else self.config.large_segment_size
        device = self.capacity_bytes or _DEVICE_WITHOUT_CAPACITY
        span = -(-(device + device // 8) // page) * page
        seg = Segment(self._address(span, page), page, span)
        block = Block(span, seg.base, pool, seg)
        block.mapped = False
        pool.unmapped.append(block)
        return block

    def _map_block(self, block: Block, size: int) -> bool:
        """map_block: the pages over the block's first ``size`` bytes are mapped (all or none,
        as ExpandableSegment::map), the rest stays unmapped; reserved grows by the pages."""
        assert block.seg is not None
        _, mapped = block.seg.pages_over(block.ptr, size)
        if not self._fits(mapped):
            return False
        pool = block.pool
        pool.unmapped.remove(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.size - mapped, block.ptr + mapped, pool, block.seg)
            rest.mapped = False
            splice(rest, block, block.next)
            pool.unmapped.append(rest)
            block.size = mapped
        merge(block, block.prev)
        merge(block, block.next)
        pool.insert(block)
        self._reserve(mapped)
        return True

    # -- memory back to the driver ---------------------------------------------------------

    def _release_block(self, block: Block) -> None:
        """release_block: cudaFree a cached segment."""
        block.pool.erase(block)
        self.reserved_bytes -= block.size
        self.segment_count -= 1

    def _release_blocks(self, pool: Pool) -> None:
        """release_blocks: cudaFree every cached segment that is not split; unmap the whole
        free pages of expandable segments (unmap_block), and drop a segment left unmapped
        (release_expandable_segment)."""
        expandable = []
        for _, _, block in list(pool.free):
            if block.seg is not None:
                expandable.append(block)
            elif not block.is_split():
                self._release_block(block)
        for block in expandable:
            self._unmap_block(block)
            if not block.is_split():
                pool.unmapped.remove(block)

    def _unmap_block(self, block: Block) -> None:
        """unmap_block: a free block's whole pages are unmapped; the parts of pages at either
        end stay mapped, as free blocks of their own."""
        seg, pool = block.seg, block.pool
        assert seg is not None
        start, size = seg.pages_inside(block.ptr, block.size)
        if size == 0:
            return
        pool.erase(block)
        if start > block.ptr:
            before = Block(start - block.ptr, block.ptr, pool, seg)
            splice(before, block.prev, block)
            pool.insert(before)
        if block.ptr + block.size > start + size:
            after = Block(block.ptr + block.size - start - size, start + size, pool, seg)
            splice(after, block, block.next)
            pool.insert(after)
        block.ptr, block.size, block.mapped = start, size, False
        merge(block, block.prev)
        merge(block, block.next)
        pool.unmapped.append(block)
        self.reserved_bytes -= size

    def _release_available_cached_blocks(self, pool: Pool, size: int) -> bool:
        """release_available_cached_blocks, only with max_split_size set: cudaFree the smallest
        oversize cached block as large as the request, else the largest ones until enough."""
        cutoff = self.config.max_split_size
        if cutoff == SIZE_MAX:
            return False
        key = max(size, cutoff)
        i = pool.at_least(key)
        if i < len(pool.free) and pool.free[i][2].seg is None:
            self._release_block(pool.free[i][2])
            return True
        released = 0
        i -= 1
        while released < key and i >= 0 and pool.free[i][2].size >= cutoff:
            block = pool.free[i][2]
            if block.seg is None:
                released += block.size
                self._release_block(block)
            i -= 1
        return released >= key

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: with reserved memory over garbage_collection_threshold
        of the allowed memory (which needs per_process_memory_fraction), cudaFree the large
        pool's unsplit cached blocks unused for the average age or longer, until under it."""
        assert self._allowed is not None
        threshold = int(self.config.garbage_collection_threshold * self._allowed)
        if self.reserved_bytes <= threshold:
            return
        target, reclaimed = self.reserved_bytes - threshold, 0
        pool = self._large
        ages = [pool.calls - b.gc_base for _, _, b in pool.free if not b.is_split()]
        total_age, count = sum(ages), len(ages)
        freed = True
        while reclaimed < target and freed and count > 0:
            average = total_age / count
            freed = False
            for _, _, block in list(pool.free):
                age = pool.calls - block.gc_base
                if not block.is_split() and block.seg is None and age >= average:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    count -= 1
                    self._release_block(block)
