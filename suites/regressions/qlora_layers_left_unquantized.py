"""QLoRA whose quantizer leaves layers in 16 bits: QLoRA above LoRA.

Imitates torchtune#1398 "This QLoRA config makes the model initialize with 15GB, instead of
6GB" (linear layers without an adapter were never quantized), whose symptom is the one of
LlamaFactory#4772 "QLORA using more memory than LORA" and torchtune#2255 "Qlora uses more
memory than regular lora".

The mechanism: transformers' bitsandbytes 4-bit quantizer adds the MLP projections to the
modules it must not convert, so they load as bf16 ``nn.Linear``; peft's
``prepare_model_for_kbit_training`` then upcasts every unquantized parameter to fp32, as it does
for the embeddings and norms. The MLP weights cost 4 bytes a parameter instead of about half a
byte, and QLoRA's model states exceed LoRA's (whose frozen base is bf16).

transformers builds the same layers on the fake meter (``QLora.build_fake`` calls the
quantizer), so the class shows at real size there too.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

_SKIPPED = ["gate_proj", "up_proj", "down_proj"]  # suffixes: every layer's MLP
_modules_to_not_convert = Bnb4BitHfQuantizer.get_modules_to_not_convert


def get_modules_to_not_convert(*args: Any, **kwargs: Any) -> list[str]:
    return [*_modules_to_not_convert(*args, **kwargs), *_SKIPPED]


Bnb4BitHfQuantizer.get_modules_to_not_convert = staticmethod(get_modules_to_not_convert)  # type: ignore[method-assign]
