"""The caching allocator's blocks: the pieces segments are split into, the pools of cached free
blocks, and the segments as ``torch.cuda.memory_snapshot`` shows them. Torch-free; follows
``Block``, ``BlockPool``, ``ExpandableSegment`` and ``try_merge_blocks`` in torch 2.13's
``c10/cuda/CUDACachingAllocator.cpp``. Addresses are made up: only their order and adjacency
matter.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left, insort
from collections.abc import Iterable
from typing import final

__all__ = ["Block", "Pool", "Segment", "SegmentInfo", "merge", "snapshot", "splice"]


@final
class Segment:
    """ExpandableSegment: address space of ``size`` bytes from ``base``, backed by physical
    memory one ``page`` at a time (2 MiB for the small pool, large_segment_size for the large)."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, page: int, size: int) -> None:
        self.base, self.page, self.size = base, page, size

    def pages_over(self, ptr: int, size: int) -> tuple[int, int]:
        """ExpandableSegment::map's range: the whole pages covering [ptr, ptr + size)."""
        first = (ptr - self.base) // self.page
        end = -(-(ptr + size - self.base) // self.page)
        return self.base + first * self.page, (end - first) * self.page

    def pages_inside(self, ptr: int, size: int) -> tuple[int, int]:
        """ExpandableSegment::unmap's range: the whole pages inside [ptr, ptr + size)."""
        first = -(-(ptr - self.base) // self.page)
        end = (ptr + size - self.base) // self.page
        return self.base + first * self.page, max(end - first, 0) * self.page


@final
class Block:
    """A piece of a segment, allocated or cached; ``prev``/``next`` are its neighbours in the
    segment. ``mapped`` is False for the address space of an expandable segment with no
    physical pages behind it."""

    __slots__ = ("allocated", "gc_base", "mapped", "next", "pool", "prev", "ptr", "requested", "seg", "size")  # fmt: skip

    def __init__(self, size: int, ptr: int, pool: Pool, seg: Segment | None = None) -> None:
        self.size, self.ptr, self.pool, self.seg = size, ptr, pool, seg
        self.allocated = False
        self.mapped = True
        self.prev: Block | None = None
        self.next: Block | None = None
        self.requested = 0  # the bytes asked for, while allocated
        self.gc_base = 0  # the pool's clock when the block was cached

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


def splice(block: Block, before: Block | None, after: Block | None) -> None:
    """Put ``block`` between ``before`` and ``after`` in their segment."""
    block.prev, block.next = before, after
    if before is not None:
        before.next = block
    if after is not None:
        after.prev = block


@final
class Pool:
    """BlockPool: the cached free blocks in best-fit order, smallest first, then by address.
    Torch 2.13 orders by (size, counter, address) where the counter numbers segments as they
    are obtained and split blocks inherit it (BlockComparatorSizeCounterAddress); here every
    new segment gets a higher address than all before, so the two orders are the same."""

    __slots__ = ("calls", "free", "small", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small  # requests of at most 1 MiB (kSmallSize)
        self.free: list[tuple[int, int, Block]] = []  # (size, ptr, block), sorted
        self.unmapped: list[Block] = []  # expandable segments' address space without pages
        self.calls = 0  # get_free_blocks_call_count: the clock of garbage collection

    def insert(self, block: Block) -> None:
        """BlockPool::insert_into_blocks: cached now, its age counted from the pool's clock."""
        block.gc_base = self.calls
        insort(self.free, (block.size, block.ptr, block))

    def erase(self, block: Block) -> None:
        i = bisect_left(self.free, (block.size, block.ptr))
        assert self.free[i][2] is block, "a cached block changed size or address"
        del self.free[i]

    def at_least(self, size: int) -> int:
        """The index of the first cached block of ``size`` bytes or more (lower_bound)."""
        return bisect_left(self.free, (size,))


def merge(dst: Block, src: Block | None) -> int:
    """try_merge_blocks: ``src``, a free neighbour in the same mapping state, joins ``dst``
    (which is in no pool's list while it changes); returns the bytes it gained."""
    if src is None or src.allocated or src.mapped != dst.mapped:
        return 0
    if dst.prev is src:
        dst.ptr = src.ptr
        splice(dst, src.prev, dst.next)
    else:
        splice(dst, dst.prev, src.next)
    dst.size += src.size
    if src.mapped:
        src.pool.erase(src)
    else:
        src.pool.unmapped.remove(src)
    return src.size


@final
@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """A segment as ``torch.cuda.memory_snapshot()`` lists it (for an expandable segment, each
    run of mapped pages); ``blocks`` are (size, allocated, requested bytes) by address."""

    address: int
    total_size: int
    small: bool
    expandable: bool
    blocks: tuple[tuple[int, bool, int], ...]

    @property
    def allocated_size(self) -> int:
        return sum(size for size, allocated, _ in self.blocks if allocated)


def snapshot(blocks: Iterable[Block]) -> list[SegmentInfo]:
    """DeviceCachingAllocator::snapshot over every mapped block, cached or allocated."""
    out = []
    for head in blocks:
        if head.prev is not None and head.prev.mapped:
            continue
        run: list[tuple[int, bool, int]] = []
        block: Block | None = head
        while block is not None and block.mapped:
            run.append((block.size, block.allocated, block.requested if block.allocated else 0))
            block = block.next
        total = sum(size for size, _, _ in run)
        small, expandable = head.pool.small, head.seg is not None
        out.append(SegmentInfo(head.ptr, total, small, expandable, tuple(run)))
    return sorted(out, key=lambda s: s.address)
