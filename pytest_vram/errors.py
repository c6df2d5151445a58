"""The errors every part raises, and how failures are told apart. Torch-free and at the bottom
of the import graph: the pytest process, the worker and ZeRO's ranks all read them."""

from __future__ import annotations

import importlib.util
from typing import Final

__all__ = [
    "EXTRAS",
    "SpecError",
    "Unsupported",
    "extra",
    "installed",
    "is_oom",
    "missing_library",
]


class SpecError(ValueError):
    """A spec argument has a bad value; the message names the argument and the value."""


class Unsupported(Exception):
    """This combination cannot run here; the message names the library call that prevents it."""


# How an out-of-memory error reads when it arrives as text: the CPU allocator's, and CUDA's
# (torch.OutOfMemoryError, or a RuntimeError from a library that re-raised it).
_OOM_TEXTS: Final = ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error, of the host or of a GPU."""
    if isinstance(exc, MemoryError):  # ranks.RankOutOfMemory is one
        return True
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or any(t in text for t in _OOM_TEXTS)


def installed(module: str) -> bool:
    """Whether ``module`` (``deepspeed``, ``galore_torch``) can be imported, without importing
    it: the optional libraries are large, and some touch CUDA when imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


# What each of pytest-vram's extras installs, as pip takes it (pyproject.toml's
# optional-dependencies; tests/test_nvml.py keeps the two the same). pytest-vram installs from a
# checkout or a wheel, not from PyPI, so a message names the libraries, not "pytest-vram[zero]".
EXTRAS: Final = {
    "zero": "'deepspeed>=0.16,<0.20' 'ninja>=1.11'",
    "quant": "'bitsandbytes>=0.45,<0.51'",
    "gpu": "'nvidia-ml-py>=12'",
    "report": "'matplotlib>=3.10,<3.12'",
}


def extra(name: str) -> str:
    """What follows ``pip install`` for one of pytest-vram's extras, saying which it is."""
    return f"{EXTRAS[name]} (pytest-vram's {name} extra)"


def missing_library(name: str, install: str, *, needed_by: str = "") -> str:
    """The one line that says an optional library is missing and how to install it.

    ``name`` is what pip calls it (``nvidia-ml-py``, not its module ``pynvml``); ``install``
    is what follows ``pip install`` (``extra("zero")``, ``galore-torch``). ``needed_by``
    starts the sentence with who needs it: ``needed_by="zero=2 runs"`` gives ``zero=2 runs
    DeepSpeed, which is not installed: pip install ...``."""
    missing = f"{needed_by} {name}, which is" if needed_by else f"{name} is"
    return f"{missing} not installed: pip install {install}"
