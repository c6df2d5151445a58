"""LoRA on a bitsandbytes-quantized base model: QLoRA (4-bit) and 8-bit LoRA.

transformers quantizes only while loading weights (``from_config`` with a quantization config
leaves them in full precision), so the random model is saved to a temporary directory and loaded
back through ``from_pretrained``. The quantization constants live on the weights, not in
``buffers()``; ``state_tensors`` hands them to the meter as model state.

On the fake meter there are no weights to save, and bitsandbytes' Params4bit (a Tensor subclass
made with ``_make_subclass``) cannot wrap a fake tensor; ``QLora.build_fake`` builds the same
model from transformers' quantizer and bitsandbytes' ``quantize_4bit`` (see there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, final

from pytest_vram.errors import Unsupported, extra, installed, missing_library
from pytest_vram.methods import LlamaFactoryRow, Method, OptionValue, Trains, state_tensors
from pytest_vram.methods.lora import lora_config
from pytest_vram.methods.peft_methods import LORA_OPTIONS

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

    from pytest_vram.spec import StepSpec


class _Quantized(Method):
    """Load the base through bitsandbytes, prepare it with peft for k-bit training, add LoRA."""

    options: Mapping[str, OptionValue] = LORA_OPTIONS
    trains = Trains.LORA
    llama_factory_row = LlamaFactoryRow.QLORA  # by base_weight_bits: LLaMA-Factory's 4 and 8

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        raise NotImplementedError

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        # bitsandbytes is not a dependency of pytest-vram; on CPU it runs (its own fallbacks).
        if not installed("bitsandbytes"):
            needs = missing_library("bitsandbytes", extra("quant"), needed_by=f"{self.name} needs")
            return f"{needs}; transformers' from_pretrained with a BitsAndBytesConfig imports it"
        return None

    def build_model(self, spec: StepSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
        import os
        import tempfile

        import safetensors.torch
        import torch
        from torch._guards import detect_fake_mode

        from pytest_vram import zoo

        if detect_fake_mode() is not None:
            return self.build_fake(spec, dtype, device)
        auto = zoo.auto_class(spec.model)  # the class build_model used: the same model returns
        with tempfile.TemporaryDirectory(prefix="pytest-vram-") as folder:
            source = zoo.build_model(spec.model, torch.bfloat16, "cpu", spec.attention)
            # Not save_pretrained: under torch.distributed (ZeRO ranks) it writes on rank 0
            # only, and each rank loads from its own folder.
            source.config.save_pretrained(folder)
            safetensors.torch.save_model(source, os.path.join(folder, "model.safetensors"))
            del source  # not alive during the steps: only the quantized copy is
            model: torch.nn.Module = auto.from_pretrained(
                folder,
                quantization_config=self.quantization_config(spec),
                device_map=device,
                dtype=dtype,
                # Not in the saved config: without it transformers picks sdpa where it can.
                attn_implementation=spec.attention,
            )
        return model

    def build_fake(self, spec: StepSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
        """The quantized model under FakeTensorMode (no weights to load)."""
        raise Unsupported(
            f"{self.name} is not supported on the fake meter: bitsandbytes' quantized parameter "
            "is a torch.Tensor subclass (made with _make_subclass), which cannot wrap a fake tensor"
        )

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
            # One Python object per live storage; data_ptr() cannot tell fake storages apart.
            storage = weight.untyped_storage()
            for tensor in state_tensors(holders):
                if tensor.untyped_storage() is not storage:
                    yield tensor


@final
class QLora(_Quantized):
    """QLoRA: NF4 4-bit base weights (double-quantized constants), bf16 compute, LoRA adapters."""

    name = "qlora"
    options: Mapping[str, OptionValue] = {**LORA_OPTIONS, "double_quant": True}
    base_weight_bits = 4
    runs_under_zero = True
    fake_meter_blocker = None  # build_fake rebuilds the 4-bit layers from their parts

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.method_option("double_quant"),
            bnb_4bit_compute_dtype=torch.bfloat16,
        )

    def build_fake(self, spec: StepSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
        """What ``from_pretrained`` builds, from the parts it calls: the model in ``dtype`` (the
        checkpoint is cast to it before quantizing), transformers' quantizer swapping in its
        Linear4bit layers, and each weight quantized by bitsandbytes' ``quantize_4bit`` with the
        layer's settings, as ``Params4bit._quantize`` does. The packed weight stays a plain
        (fake) parameter that carries Params4bit's attributes, which bitsandbytes' and peft's
        code reads; the sizes are the ones bitsandbytes' own fake kernels give."""
        import torch
        from bitsandbytes import functional
        from bitsandbytes.nn.modules import Linear4bit
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers.quantizers.auto import AutoHfQuantizer

        from pytest_vram import zoo

        model = zoo.build_model(spec.model, dtype, device, spec.attention)
        linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        quantizer = AutoHfQuantizer.from_config(self.quantization_config(spec))
        with unset_fake_temporarily():
            # Its layers are made on meta, where Params4bit can wrap the (real) meta tensor.
            quantizer.preprocess_model(model, dtype=dtype, device_map={"": device})
            # bitsandbytes makes its 8-bit map for the nested constants from values (.tolist())
            # on first use and keeps it (functional.quantize_blockwise): made real here.
            nested = quantizer.quantization_config.bnb_4bit_use_double_quant
            if nested and "dynamic" not in functional.name2qmap:
                functional.name2qmap["dynamic"] = functional.create_dynamic_map()  # type: ignore[no-untyped-call]
        for name, layer in model.named_modules():
            if not isinstance(layer, Linear4bit):
                continue
            settings: dict[str, Any] = dict(vars(layer.weight))  # the meta Params4bit's
            source = linears[name]
            packed, layer.quant_state = functional.quantize_4bit(
                source.weight.data.contiguous(),  # as Params4bit._quantize: no autograd graph
                blocksize=settings["blocksize"],
                compress_statistics=settings["compress_statistics"],
                quant_type=settings["quant_type"],
                quant_storage=settings["quant_storage"],
            )
            weight: Any = torch.nn.Parameter(packed, requires_grad=False)
            for key, value in settings.items():
                setattr(weight, key, value)
            weight.quant_state, weight.bnb_quantized = layer.quant_state, True
            layer.weight, layer.bias = weight, source.bias
        del linears
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
        return model


@final
class Lora8bit(_Quantized):
    """LoRA on an LLM.int8() base: int8 weights with one fp32 scale per output row."""

    name = "lora-8bit"
    base_weight_bits = 8
    runs_under_zero = False
    fake_meter_blocker = (
        "bitsandbytes' Int8Params is a torch.Tensor subclass made with _make_subclass, which "
        "cannot wrap a fake tensor (the fake meter rebuilds QLoRA's 4-bit layers around this, "
        "not LLM.int8()'s)"
    )

    def quantization_config(self, spec: StepSpec) -> BitsAndBytesConfig:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


REGISTER = [QLora(), Lora8bit()]
