"""LoRA on a bitsandbytes-quantized base model: QLoRA (4-bit) and 8-bit LoRA.

transformers quantizes only while loading weights (``from_config`` with a quantization config
leaves them in full precision), so the random model is saved to a temporary directory and loaded
back through ``from_pretrained``. The quantization constants live on the weights, not in
``buffers()``; ``state_tensors`` hands them to the meter as model state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, final

from pytest_vram.methods import Method, state_tensors
from pytest_vram.methods.lora import lora_config
from pytest_vram.methods.peft_methods import LORA_OPTIONS
from pytest_vram.spec import OptionValue

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

    from pytest_vram.spec import StepSpec


class _Quantized(Method):
    """Load the base through bitsandbytes, prepare it with peft for k-bit training, add LoRA."""

    options: Mapping[str, OptionValue] = LORA_OPTIONS

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        raise NotImplementedError

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        import importlib.util

        # bitsandbytes is not a dependency of pytest-vram; on CPU it runs (its own fallbacks).
        if importlib.util.find_spec("bitsandbytes") is None:
            return (
                f"{self.name} needs bitsandbytes: transformers' from_pretrained with a "
                "BitsAndBytesConfig imports it to quantize"
            )
        return None

    def build_model(self, spec: StepSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
        import tempfile

        import torch

        from pytest_vram import zoo

        auto = zoo.auto_class(spec.model)  # the class build_model used: the same model returns
        with tempfile.TemporaryDirectory(prefix="pytest-vram-") as folder:
            source = zoo.build_model(spec.model, torch.bfloat16, "cpu")
            source.save_pretrained(folder)
            del source  # not alive during the steps: only the quantized copy is
            model: torch.nn.Module = auto.from_pretrained(
                folder,
                quantization_config=self.quantization_config(spec),
                device_map=device,
                dtype=dtype,
            )
        return model

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        from peft import get_peft_model, prepare_model_for_kbit_training

        # peft casts the unquantized bf16 parameters (embeddings, norms, lm_head) to fp32 here.
        # The checkpointing kwargs are run_step's, so peft re-enables it the same way.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=spec.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return get_peft_model(model, lora_config(spec))

    def state_tensors(self, model: torch.nn.Module) -> Iterable[torch.Tensor]:
        """Params4bit's QuantState (absmax, code, offset, nested state2) and Int8Params' row
        scales (SCB, also kept on the layer's MatmulLtState); never the weight's own storage,
        which ``parameters()`` already holds (Int8Params.CB is the weight's data)."""
        from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt

        for module in model.modules():
            weight: Any  # Params4bit / Int8Params: their extra attributes are untyped
            if isinstance(module, Linear4bit):
                weight = module.weight
                holders: tuple[Any, ...] = (weight.quant_state,)
            elif isinstance(module, Linear8bitLt):
                weight = module.weight
                holders = (vars(weight), module.state)
            else:
                continue
            storage = weight.untyped_storage().data_ptr()
            for tensor in state_tensors(holders):
                if tensor.untyped_storage().data_ptr() != storage:
                    yield tensor


@final
class QLora(_Quantized):
    """QLoRA: NF4 4-bit base weights (double-quantized constants), bf16 compute, LoRA adapters."""

    name = "qlora"
    options: Mapping[str, OptionValue] = {**LORA_OPTIONS, "double_quant": True}

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.method_option("double_quant"),
            bnb_4bit_compute_dtype=torch.bfloat16,
        )


@final
class Lora8bit(_Quantized):
    """LoRA on an LLM.int8() base: int8 weights with one fp32 scale per output row."""

    name = "lora-8bit"

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


REGISTER = [QLora(), Lora8bit()]
