"""DeepSpeed ZeRO-3 that keeps the layers it gathers for the forward: prefetch and release not
honoured.

Imitates DeepSpeed#7670 "[BUG] ZeRO-3 with HuggingFace Transformers: Gathered Parameters in
Forward Pass Not Released Promptly", DeepSpeed#3025 "[BUG] zero3 memory leak on return from
training loop" (gathered weights never re-partitioned) and DeepSpeed#2864 "[BUG] using
ZeRO-stage 3, buffer configs don't make memory usage change" (``stage3_max_live_parameters``
without effect).

The mechanism: the partitioned-parameter coordinator's release after each submodule's forward
is skipped, so every layer gathered for the forward stays whole until the backward releases it:
at the loss, where an LLM step peaks, each rank holds the whole model instead of its partition
and the one layer in flight, whatever ``stage3_max_live_parameters`` says.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

_release = PartitionedParameterCoordinator.release_sub_module


def release_sub_module(self: Any, submodule: Any, forward: bool = False) -> None:
    if forward:
        return  # the bug: what the forward gathered stays gathered
    _release(self, submodule, forward=forward)


PartitionedParameterCoordinator.release_sub_module = release_sub_module
