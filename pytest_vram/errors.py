"""How failures are told apart: torch-free, read by the worker and by ZeRO's ranks."""

from __future__ import annotations

from typing import Final

__all__ = ["is_oom"]

# How an out-of-memory error reads when it arrives as text: the CPU allocator's, and CUDA's
# (torch.OutOfMemoryError, or a RuntimeError from a library that re-raised it).
_OOM_TEXTS: Final = ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error, of the host or of a GPU."""
    if isinstance(exc, MemoryError):  # ranks.RankOutOfMemory is one
        return True
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or any(t in text for t in _OOM_TEXTS)
