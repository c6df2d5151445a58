"""DeepSpeed ZeRO-3 that stops partitioning parameters: a higher stage that holds more.

Imitates DeepSpeed#4305 "[BUG] ZeRO Stage 3 is consuming more memory than Stage 2 when using
DeepSpeed-Chat" and LlamaFactory#493 "Lora微调accelerate使用deepspeed zero2和zero3，占用单卡显存一样"
(LoRA under ZeRO-2 and ZeRO-3 took the same memory per GPU), through the knob DeepSpeed#2864
"[BUG] using ZeRO-stage 3, buffer configs don't make memory usage change" found ignored.

The mechanism: ZeRO-3's persistence check stops honouring the configured
``stage3_param_persistence_threshold`` and lets every parameter through, so every parameter is
"persistent" and stays whole on every rank (as small ones should). ZeRO-3 then holds the full weights beside its
partitioned gradients and optimizer state: more than ZeRO-2.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

_init = DeepSpeedZeRoOffload.__init__
_EVERY_PARAMETER = 2**62


def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
    kwargs["param_persistence_threshold"] = _EVERY_PARAMETER  # the config's value, not honoured
    _init(self, *args, **kwargs)


DeepSpeedZeRoOffload.__init__ = __init__
