"""The errors every part raises, and how failures are told apart. Torch-free and at the bottom
of the import graph: the pytest process, the worker and ZeRO's ranks all read them."""

from __future__ import annotations

from typing import Final

__all__ = ["SpecError", "Unsupported", "is_oom"]


class SpecError(ValueError):
    """A spec argument has a bad value; the message names the argument and the value."""


class Unsupported(Exception):
    """This combination cannot run here; the message names the library call that prevents it."""


# How an out-of-memory error reads when it arrives as text: the CPU allocator's, and CUDA's
# (torch.OutOfMemoryError, or a RuntimeError from a library that re-raised it).
_OOM_TEXTS: Final = ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error, of the host or of a GPU."""
    if isinstance(exc, MemoryError):  # zero.ranks.RankOutOfMemory is one
        return True
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or any(t in text for t in _OOM_TEXTS)
