"""peft DoRA that recomputes the base layer's output: DoRA's activations grow.

Imitates the DoRA memory fix peft shipped in peft#2122 "Optimize DoRA in `eval` and `no
dropout`" (requested in peft#2107 "Optimize DoRA computation when there is no dropout"), undone,
in the class of peft#2196 "Memory Inefficiency for LoRA & DoRA during fine-tuning.".

The mechanism: without dropout, DoRA reuses the base layer's result; with the fix undone it
passes ``base_result=None``, so each DoRA layer casts the frozen weight to the adapters' dtype and
computes ``x @ W.T`` again, and autograd keeps both for the backward: a weight-sized fp32 copy and
an output-sized fp32 tensor more per adapted layer.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.variants import DoraLinearVariant


def forward(
    module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    dropout = module.lora_dropout[active_adapter]
    extra: torch.Tensor = module.lora_magnitude_vector[active_adapter](
        dropout(x),
        lora_A=module.lora_A[active_adapter],
        lora_B=module.lora_B[active_adapter],
        scaling=module.scaling[active_adapter],
        base_layer=module.get_base_layer(),
        base_result=None,  # the bug: the base output is recomputed, not reused
        adapter_name=active_adapter,
    )
    return result + extra


DoraLinearVariant.forward = staticmethod(forward)  # type: ignore[method-assign]
