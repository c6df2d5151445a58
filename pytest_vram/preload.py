"""What a worker server imports before it forks its cases, and the variables it runs with.

Torch-free: the pytest process reads these lists and starts the server with them.
"""

from __future__ import annotations

from typing import Final

from pytest_vram.forksafe import ARM_VARIABLE, NVML_CHECK

__all__ = ["RANK_PARENT_MODULES", "SERVER_ENV", "preload_modules"]

# Imported once in the server, before any case forks from it. Libraries that make tensors at
# import time (peft, badam) must be in the host meter's list, or those bytes land in the first
# measured window; a case child imports its meter's list again (a no-op when the server had it)
# so a host case measures the same in a GPU session's server. Missing ones are skipped.
_HOST_PRELOAD: Final = (
    "pytest_vram.quiet",  # first: its filters drop the libraries' import chatter below
    "torch",
    "transformers",
    "peft",
    "badam",
    "trl.trainer.utils",
    "deepspeed",  # once here, not in each ZeRO rank after its fork (0.7 s each)
    "pytest_vram.step",
    "pytest_vram.meters.host",
    "pytest_vram.frozen_heap",  # last: freezes what the imports above made
)
# The cuda server's children must not be forks of a process that touched CUDA: only modules
# that call no torch.cuda probe at import (tests/test_forksafe.py checks each one). peft, badam
# and trl import bitsandbytes, which calls is_available(), device_count() and, on a GPU,
# get_device_capability() at import; the cases import them after the fork.
_CUDA_PRELOAD: Final = (
    "pytest_vram.forksafe",  # first: arms itself (ARM_VARIABLE) so later probes are remembered
    "pytest_vram.quiet",
    "pytest_vram.deferred_compile",  # for the cases' own import of bitsandbytes (peft)
    "torch",
    "transformers",
    "pytest_vram.step",
    "pytest_vram.meters.cuda",
    "pytest_vram.frozen_heap",  # last: freezes what the imports above made
)
# What a cuda case's child imports before it forks its ZeRO ranks; the same rule applies.
RANK_PARENT_MODULES: Final = (
    "pytest_vram.meters",
    "pytest_vram.methods",
    "pytest_vram.stages",
    "pytest_vram.ranks",
    "pytest_vram.zero.engine",
)
# Set for the server's life. cuda: is_available()/device_count() ask NVML and leave fork usable.
# host: DeepSpeed takes its accelerator at import, and the host server runs only host cases.
_HOST_ENV: Final = {"DS_ACCELERATOR": "cpu"}
SERVER_ENV: Final = {
    "cuda": {NVML_CHECK: "1", ARM_VARIABLE: "1"},
    "host": _HOST_ENV,
    "fake": _HOST_ENV,
}


def preload_modules(meter: str) -> tuple[str, ...]:
    """The modules a worker server for ``meter`` imports before forking its cases."""
    if meter == "cuda":
        return _CUDA_PRELOAD
    if meter in ("host", "fake"):
        return _HOST_PRELOAD
    raise ValueError(f"unknown meter {meter!r}; known: host, cuda, fake")
