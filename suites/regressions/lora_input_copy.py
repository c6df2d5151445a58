"""peft LoRA layers that keep an extra copy of their input: adapter activations double.

Imitates peft#2196 "Memory Inefficiency for LoRA & DoRA during fine-tuning." (the memory for
activations almost doubled against full fine-tuning) and peft#1514 "Tinyllama with Lora
consumes more memory than full-finetuning", the class torchtune#1492 "expose and set
lora_dropout = 0.0" names for dropout ("dropout creates a new copy of the tensor, increasing
memory usage").

The mechanism: each LoRA ``Linear`` runs its adapter branch on a materialised copy of its input
(made, as a dropout would, for the adapter path) and keeps that copy on the layer until its next
forward, beside the input autograd already saves for ``lora_A``: one input-sized tensor more per
adapted layer, at the adapters' dtype (fp32 in peft by default).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear

_forward = Linear.forward


def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.training and not self.disable_adapters and not self.merged:
        dtype = next(iter(self.lora_A.values())).weight.dtype
        self._adapter_input = x.detach().to(dtype, copy=True)  # the bug: kept on the layer
    out: torch.Tensor = _forward(self, x, *args, **kwargs)
    return out


Linear.forward = forward
