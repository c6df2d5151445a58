"""peft's other adapter methods: LoRA variants, IA3, VeRA and the prompt-learning family.

Each is one peft config handed to ``get_peft_model``; LoRA+ differs from LoRA only in its
optimizer, which peft's ``create_loraplus_optimizer`` builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, final

from pytest_vram import methods
from pytest_vram.methods import Method, Optimizer, OptionValue, Trains
from pytest_vram.methods.lora import LoraFamily, lora_config, target_modules
from pytest_vram.methods.optim import torch_kwargs

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig

    from pytest_vram.spec import StepSpec

__all__ = ["LORA_OPTIONS", "lora_config"]

# The LoRA variants take LoRA's options (rank, alpha, dropout, targets) and their defaults.
LORA_OPTIONS: Final[Mapping[str, OptionValue]] = dict(LoraFamily.options)


def _peft(model: torch.nn.Module, config: PeftConfig) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, config)


@final
class Dora(LoraFamily):
    """DoRA: LoRA plus a trained magnitude vector per adapted Linear (peft ``use_dora``)."""

    name = "dora"

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        return _peft(model, lora_config(spec, use_dora=True))


@final
class Pissa(LoraFamily):
    """PiSSA: adapters initialised from the base weight's top singular vectors (and the base
    keeps the residual). ``niter`` > 0 is peft's fast randomised SVD, 0 the full SVD."""

    name = "pissa"
    options: Mapping[str, OptionValue] = {**LORA_OPTIONS, "niter": 4}

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        niter = spec.method_option("niter")
        init = f"pissa_niter_{niter}" if niter > 0 else "pissa"
        return _peft(model, lora_config(spec, init_lora_weights=init))

    def incompatible(self, spec: StepSpec) -> str | None:
        niter = spec.method_option("niter")
        return f"method_options: niter={niter} must be >= 0" if niter < 0 else None


@final
class RsLora(LoraFamily):
    """rsLoRA: LoRA scaled by alpha / sqrt(rank); the same tensors as LoRA."""

    name = "rslora"

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        return _peft(model, lora_config(spec, use_rslora=True))


@final
class LoraPlus(LoraFamily):
    """LoRA+: LoRA whose B matrices learn ``loraplus_lr_ratio`` times faster (peft's
    ``create_loraplus_optimizer`` groups them); tensors and optimizer state are LoRA's."""

    name = "lora+"
    options: Mapping[str, OptionValue] = {**LORA_OPTIONS, "loraplus_lr_ratio": 16.0}

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        return _peft(model, lora_config(spec))

    def build_optimizer(self, model: torch.nn.Module, spec: StepSpec, optimizer: Optimizer) -> Any:
        import torch
        from peft.optimizers import create_loraplus_optimizer

        assert optimizer.torch_class is not None  # incompatible() refused the others
        cls = getattr(torch.optim, optimizer.torch_class)
        kwargs = torch_kwargs(optimizer.options, spec)
        if "weight_decay" in kwargs:
            # peft applies weight decay per group through this key, not the optimizer's own.
            kwargs["loraplus_weight_decay"] = kwargs.pop("weight_decay")
        return create_loraplus_optimizer(
            model,  # type: ignore[arg-type]
            cls,
            loraplus_lr_ratio=spec.method_option("loraplus_lr_ratio"),
            **kwargs,
        )

    def incompatible(self, spec: StepSpec) -> str | None:
        if methods.OPTIMIZERS[spec.optimizer].torch_class is None:
            known = ", ".join(n for n, o in methods.OPTIMIZERS.items() if o.torch_class)
            return (
                f"lora+ builds its param groups with peft's create_loraplus_optimizer around a "
                f"torch optimizer class; optimizer {spec.optimizer!r} is not one of: {known}"
            )
        return None


class _Adapter(Method):
    """A peft adapter that is not LoRA's: no ZeRO run, no row in LLaMA-Factory's table, and
    parameter names BAdam's LoRA mode does not recognise."""

    trains = Trains.OTHER
    runs_under_zero = False
    fake_meter_blocker = None
    llama_factory_row = None
    base_weight_bits = None


@final
class Ia3(_Adapter):
    """IA3: learned scaling vectors on peft's default targets for the model type (llama:
    k_proj, v_proj and the feed-forward down_proj, scaled on its input)."""

    name = "ia3"
    options: Mapping[str, OptionValue] = {}

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        from peft import IA3Config
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
        )

        # peft has no entry for vision-language types (qwen2_vl); their language model has
        # llama's layer names, which match no module of the vision tower.
        kind = getattr(model.config, "model_type", "")
        if kind not in TARGETS:
            kind = "llama"
        config = IA3Config(
            task_type="CAUSAL_LM",
            target_modules=TARGETS[kind],
            feedforward_modules=FEEDFORWARD[kind],
        )
        return _peft(model, config)


@final
class Vera(_Adapter):
    """VeRA: one pair of frozen random projections (fp32 buffers ``vera_A``, ``vera_B``, sized
    to the largest adapted Linear and sliced per layer) shared by every layer; each layer trains
    only two scaling vectors, ``vera_lambda_d`` (rank) and ``vera_lambda_b`` (out features).
    peft's defaults but for the targets, which are LoRA's here (peft: q_proj, v_proj)."""

    name = "vera"
    options: Mapping[str, OptionValue] = {
        "rank": 256,
        "targets": "all-linear",
        "dropout": 0.0,
        "d_initial": 0.1,
        "projection_prng_key": 0,
    }

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        from peft import VeraConfig

        config = VeraConfig(
            r=spec.method_option("rank"),
            target_modules=target_modules(spec),
            vera_dropout=spec.method_option("dropout"),
            d_initial=spec.method_option("d_initial"),
            projection_prng_key=spec.method_option("projection_prng_key"),
            task_type="CAUSAL_LM",
        )
        return _peft(model, config)

    def incompatible(self, spec: StepSpec) -> str | None:
        rank = spec.method_option("rank")
        return f"method_options: rank={rank} must be >= 1" if rank < 1 else None


class _PromptLearning(_Adapter):
    """Virtual tokens trained in front of every sequence; the base model is frozen."""

    options: Mapping[str, OptionValue] = {"num_virtual_tokens": 20}
    config_class: str  # the peft config that differs between the family's members

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        import peft

        config: PeftConfig = getattr(peft, self.config_class)(
            task_type="CAUSAL_LM", num_virtual_tokens=spec.method_option("num_virtual_tokens")
        )
        return _peft(model, config)

    def incompatible(self, spec: StepSpec) -> str | None:
        n = spec.method_option("num_virtual_tokens")
        return f"method_options: num_virtual_tokens={n} must be >= 1" if n < 1 else None


@final
class Prefix(_PromptLearning):
    """Prefix tuning: trained key/value prefixes in every layer, passed as a cache."""

    name = "prefix"
    config_class = "PrefixTuningConfig"

    def incompatible(self, spec: StepSpec) -> str | None:
        if spec.grad_ckpt:
            return (
                "prefix tuning cannot run with grad_ckpt=True: get_peft_model raises "
                "'PREFIX_TUNING does not work with gradient checkpointing' (peft's "
                "PeftModel._setup_prompt_encoder; the prefixes travel as a key/value cache)"
            )
        return super().incompatible(spec)


@final
class PTuning(_PromptLearning):
    """P-tuning: virtual token embeddings produced by peft's prompt encoder (an MLP)."""

    name = "p-tuning"
    config_class = "PromptEncoderConfig"


@final
class Prompt(_PromptLearning):
    """Prompt tuning: trained virtual token embeddings, randomly initialised."""

    name = "prompt"
    config_class = "PromptTuningConfig"


REGISTER = [Dora(), Pissa(), RsLora(), LoraPlus(), Ia3(), Vera(), Prefix(), PTuning(), Prompt()]
