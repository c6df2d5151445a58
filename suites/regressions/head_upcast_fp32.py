"""A bf16 LoRA run whose final norm and LM head are silently upcast to fp32.

Imitates peft#1149 "out of memory because peft casts data from 16 to 32 bits" and peft#816
"Question: why does prepare_model_for_kbit_training cast input **and** output embeddings to
float32?", the cost unslothai/unsloth#1186 "25% less mem and 10% faster training: Do not upcast
lm_head and embedding to float32" took back.

The mechanism: ``get_peft_model`` upcasts the frozen final norm and LM head to fp32 "for
training stability", as ``prepare_model_for_kbit_training`` does for quantized models, on a
model that is not quantized: the head's weight doubles, and the norm's output, the logits and
their gradients are fp32 instead of bf16.
"""

from __future__ import annotations

from typing import Any

import peft
import peft.mapping_func
import torch

_get_peft_model = peft.mapping_func.get_peft_model


def get_peft_model(model: Any, *args: Any, **kwargs: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for module in (getattr(decoder, "norm", None), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            weight.data = weight.data.float()  # the bug: an fp32 upcast of a frozen weight
    return _get_peft_model(model, *args, **kwargs)


peft.mapping_func.get_peft_model = get_peft_model
peft.get_peft_model = get_peft_model
