"""``PYTORCH_CUDA_ALLOC_CONF`` read as torch's native CUDA caching allocator reads it, and the
size rounding it controls, for the allocator simulation (``allocator.caching``).

Torch-free. Followed: torch 2.13's ``c10/core/AllocatorConfig.{h,cpp}``
(``AcceleratorAllocatorConfig::parseArgs`` and its ``parse*`` helpers, ``ConfigTokenizer``),
``c10/cuda/CUDAAllocatorConfig.{h,cpp}`` (``CUDAAllocatorConfig::parseArgs``, ``getKeys``) and
``c10/cuda/CUDACachingAllocator.cpp`` (``round_size``, ``roundup_power2_next_division``,
``get_allocation_size``). A string torch refuses raises ``AllocatorConfigError`` naming the
key and the value. Keys torch accepts that do not change device memory (the pinned host
allocator's, ``release_lock_on_cudamalloc``, ``graph_capture_record_stream_reuse``) are checked
and ignored; ``backend:cudaMallocAsync`` is a different allocator (CUDA's own pool), which is
not simulated, so it is refused too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Final, final

from pytest_vram.errors import SpecError

__all__ = [
    "AllocatorConfig",
    "AllocatorConfigError",
    "get_allocation_size",
    "round_size",
]

MIB: Final = 1 << 20
# c10/core/AllocatorConfig.h
K_MIN_BLOCK_SIZE: Final = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE: Final = MIB  # largest "small" allocation is 1 MiB
K_SMALL_BUFFER: Final = 2 * MIB  # "small" allocations are packed in 2 MiB blocks
K_MIN_LARGE_ALLOC: Final = 10 * MIB  # allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE: Final = 2 * MIB  # round up large allocations to 2 MiB
K_LARGE_BUFFER: Final = 20 * MIB  # large_segment_size_ by default
SIZE_MAX: Final = 2**64 - 1  # max_split_size_ by default: every block may be split
# AllocatorConfig.cpp: roundup_power2_divisions has one entry per power of two, 1 MiB .. 64 GiB.
_INTERVALS: Final = 16
_FIRST_INTERVAL_LOG2: Final = 20  # log2(kRoundUpPowerOfTwoStart = 1 MiB)
# The environment variables torch reads, first found wins (AcceleratorAllocatorConfig::instance).
ENV_VARS: Final = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# Keys torch 2.13 accepts that change nothing on the device: the value's kind, checked as torch
# checks it ("bool": exactly True/False; "size": a number; "threads": a power of 2 up to 128).
_IGNORED: Final = {
    "pinned_use_background_threads": "bool",
    "pinned_max_round_threshold_mb": "size",
    "pinned_max_cached_size_mb": "size",
    "release_lock_on_cudamalloc": "bool",
    "release_lock_on_hipmalloc": "bool",
    "pinned_use_cuda_host_register": "bool",
    "pinned_use_hip_host_register": "bool",
    "graph_capture_record_stream_reuse": "bool",
    "pinned_free_catch_all": "bool",
    "pinned_reserve_segment_size_mb": "positive",
    "pinned_num_register_threads": "threads",
}
_SIZE_T: Final = re.compile(r"\+?\d+")  # std::stoull reads a leading number, ignores the rest
_DOUBLE: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # std::stod's prefix


class AllocatorConfigError(SpecError):
    """A ``PYTORCH_CUDA_ALLOC_CONF`` torch would refuse, or one the simulation cannot follow;
    the message names the key and the value."""


@final
@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    """The settings of ``PYTORCH_CUDA_ALLOC_CONF`` that change device memory, in bytes."""

    large_segment_size: int = K_LARGE_BUFFER
    max_split_size: int = SIZE_MAX
    # An oversize cached block serves a request at most this much smaller than itself.
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * _INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    per_process_memory_fraction: float = 1.0
    throw_on_cudamalloc_oom: bool = False
    text: str = ""  # the string parsed

    @classmethod
    def parse(cls, text: str | None) -> AllocatorConfig:
        return _Parser(text or "").parse()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllocatorConfig:
        env = os.environ if environ is None else environ
        return cls.parse(next((env[v] for v in ENV_VARS if v in env), ""))

    def divisions(self, size: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): the entry of the
        power-of-two interval holding ``size``; below 1 MiB the first, above 32 GiB the last."""
        index = max(size.bit_length() - 1 - _FIRST_INTERVAL_LOG2, 0)
        return self.roundup_power2_divisions[min(index, _INTERVALS - 1)]


def round_size(size: int, config: AllocatorConfig) -> int:
    """round_size: at least kMinBlockSize, a multiple of it, or up to the next of ``divisions``
    equal steps between two powers of two when roundup_power2_divisions asks for it."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = config.divisions(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return _next_division(size, divisions)
    return -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def _next_division(size: int, divisions: int) -> int:
    """roundup_power2_next_division: 1200 with 4 divisions of [1024, 2048) is 1280."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def get_allocation_size(size: int, config: AllocatorConfig) -> int:
    """get_allocation_size: the segment cudaMalloc'd for a rounded request no cached block
    serves: 2 MiB for the small pool, large_segment_size (20 MiB) below 10 MiB, else the
    request rounded up to 2 MiB."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return config.large_segment_size
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


def _tokens(text: str) -> list[str]:
    """ConfigTokenizer: ``,`` ``:`` ``[`` ``]`` are tokens of their own, whitespace is dropped."""
    out: list[str] = []
    word = ""
    for ch in text:
        if ch in ",:[]":
            if word:
                out.append(word)
                word = ""
            out.append(ch)
        elif not ch.isspace():
            word += ch
    if word:
        out.append(word)
    return out


@final
class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.fields: dict[str, object] = {"text": text}

    def fail(self, key: str, why: str) -> AllocatorConfigError:
        return AllocatorConfigError(f"PYTORCH_CUDA_ALLOC_CONF={self.text!r}: {key}: {why}")

    def token(self, i: int, key: str) -> str:
        if i >= len(self.tokens):
            raise self.fail(key, "expects a value after it")
        return self.tokens[i]

    def expect(self, i: int, want: str, key: str) -> None:
        if self.token(i, key) != want:
            raise self.fail(key, f"expected {want!r}, got {self.tokens[i]!r}")

    def size_t(self, i: int, key: str) -> int:
        match = _SIZE_T.match(value := self.token(i, key))
        if match is None:
            raise self.fail(key, f"{value!r} is not a non-negative integer")
        return int(match.group())

    def double(self, i: int, key: str) -> float:
        match = _DOUBLE.match(value := self.token(i, key))
        if match is None:
            raise self.fail(key, f"{value!r} is not a number")
        return float(match.group())

    def boolean(self, i: int, key: str) -> bool:
        value = self.token(i, key)
        if value not in ("True", "False"):  # ConfigTokenizer::toBool: exactly these two
            raise self.fail(key, f"expected 'True' or 'False', got {value!r}")
        return value == "True"

    def skip_key(self, i: int, key: str) -> int:
        """ConfigTokenizer::skipKey: past ``key:value`` or ``key:[...]``."""
        self.expect(i + 1, ":", key)
        i += 2
        if self.token(i, key) == "[":
            while self.token(i, key) != "]":
                i += 1
        return i

    def parse(self) -> AllocatorConfig:
        t = self.tokens
        # large_segment_size_mb first: the minimum of max_split_size_mb and
        # max_non_split_rounding_mb is large_segment_size (AcceleratorAllocatorConfig::parseArgs).
        large = K_LARGE_BUFFER
        for i, key in enumerate(t):
            if key == "large_segment_size_mb":
                self.expect(i + 1, ":", key)
                mb = self.size_t(i + 2, key)
                if mb <= K_MIN_LARGE_ALLOC // MIB:  # parseLargeSegmentSize
                    raise self.fail(key, f"{mb} must be > {K_MIN_LARGE_ALLOC // MIB} MB")
                large = min(mb, SIZE_MAX // MIB) * MIB
        self.fields.update(large_segment_size=large, max_non_split_rounding_size=large)
        i = 0
        while i < len(t):
            i = self.item(i, t[i], large)
            if i + 1 < len(t):
                self.expect(i + 1, ",", t[i])
                i += 1
            i += 1
        return AllocatorConfig(**self.fields)  # type: ignore[arg-type]

    def item(self, i: int, key: str, large: int) -> int:
        """One ``key:value``; returns the index of its last token."""
        f = self.fields
        if key == "large_segment_size_mb":
            return self.skip_key(i, key)
        if key not in _IGNORED and key not in _KNOWN:
            raise self.fail(key, "unrecognized key, which torch refuses too")
        self.expect(i + 1, ":", key)
        i += 2
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = self.size_t(i, key)  # parseMaxSplitSize, parseMaxNonSplitRoundingSize
            if mb < large // MIB:
                raise self.fail(key, f"{mb} too small, must be >= {large // MIB}")
            name = "max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"
            f[name] = min(mb, SIZE_MAX // MIB) * MIB
        elif key == "garbage_collection_threshold":
            value = self.double(i, key)  # parseGarbageCollectionThreshold
            if not 0.0 < value < 1.0:
                raise self.fail(key, f"{value} is invalid, set it in (0.0, 1.0)")
            f[key] = value
        elif key == "per_process_memory_fraction":
            value = self.double(i, key)  # CUDAAllocatorConfig::parsePerProcessMemoryFraction
            if not 0.0 <= value <= 1.0:
                raise self.fail(key, f"{value} is invalid, set it in [0.0, 1.0]")
            f[key] = value
        elif key in ("expandable_segments", "throw_on_cudamalloc_oom"):
            f[key] = self.boolean(i, key)
        elif key == "roundup_power2_divisions":
            return self.divisions(i, key)
        elif key == "backend":
            backend = self.token(i, key)  # CUDAAllocatorConfig::parseAllocatorConfig
            if backend == "cudaMallocAsync":
                raise self.fail(key, "cudaMallocAsync is CUDA's own pool, not simulated")
            if backend != "native":
                raise self.fail(key, f"unknown backend {backend!r}: native or cudaMallocAsync")
        else:
            kind = _IGNORED[key]
            if kind == "bool":
                self.boolean(i, key)
            else:
                value_n = self.size_t(i, key)
                if kind == "positive" and value_n == 0:
                    raise self.fail(key, "has to be greater than 0")
                if kind == "threads" and (value_n & (value_n - 1) or not 0 < value_n <= 128):
                    raise self.fail(key, f"{value_n}: has to be a power of 2 up to 128")
        return i

    def divisions(self, i: int, key: str) -> int:
        """parseRoundUpPower2Divisions: ``N`` for every interval, or ``[64:8,256:4,>:1]``, a
        division count from each power-of-two boundary in MB up (the first also below it)."""
        divs = [0] * _INTERVALS
        if self.token(i, key) != "[":
            value = self.size_t(i, key)  # the old form: one count for all intervals
            if value == 0 or value & (value - 1):
                raise self.fail(key, f"{value}: the divisions has to be power of 2")
            self.fields["roundup_power2_divisions"] = (value,) * _INTERVALS
            return i
        first, last = True, 0
        i += 1
        while self.token(i, key) != "]":
            boundary = self.token(i, key)
            self.expect(i + 1, ":", key)
            value = self.size_t(i + 2, key)
            i += 2
            if value & (value - 1):
                raise self.fail(key, f"{value}: the divisions has to be power of 2 or 0")
            if boundary == ">":  # every interval above the last boundary given
                divs[last + 1 :] = [value] * (_INTERVALS - last - 1)
            else:
                mb = self.size_t(i - 2, key)
                if mb == 0 or mb & (mb - 1):
                    raise self.fail(key, f"{boundary}: the intervals have to be power of 2")
                index = min(mb.bit_length() - 1, _INTERVALS - 1)
                if first:  # the first boundary's count also covers the intervals below it
                    divs[:index] = [value] * index
                    first = False
                divs[index] = value
                last = index
            if self.token(i + 1, key) != "]":
                self.expect(i + 1, ",", key)
                i += 1
            i += 1
        self.fields["roundup_power2_divisions"] = tuple(divs)
        return i


# Keys that change device memory, handled in _Parser.item.
_KNOWN: Final = frozenset(
    {
        "max_split_size_mb",
        "max_non_split_rounding_mb",
        "garbage_collection_threshold",
        "per_process_memory_fraction",
        "expandable_segments",
        "throw_on_cudamalloc_oom",
        "roundup_power2_divisions",
        "backend",
    }
)
