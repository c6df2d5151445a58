"""Named model shapes. Only config numbers live here: weights are random, nothing is downloaded.

The real shapes (Qwen, DeepSeek distill, LLaMA) are copied from the models' published
``config.json`` files; only the fields that change memory are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, final

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "FAKE_METER_BLOCKERS",
    "MODELS",
    "ModelKind",
    "ModelShape",
    "attention_refusal",
    "build_config",
    "build_model",
    "checked_config",
    "enter",
    "model_class",
    "registered",
    "sdpa_missing",
]


ModelKind = Literal["causal-lm", "vision-language"]

# Why the fake meter (FakeTensorMode: tensors without values) cannot trace a kind of model,
# naming the library call; None: it can. Every kind has an entry; the zoo's vision-language
# models are Qwen2-VL's.
FAKE_METER_BLOCKERS: Final[Mapping[ModelKind, str | None]] = {
    "causal-lm": None,
    "vision-language": "Qwen2-VL places its 3-D rotary positions by the values of the image "
    "grid and the token ids (transformers.vision_utils.get_vision_position_ids); fake tensors "
    "hold no values",
}
# The model types the Qwen2-VL reason is true of; what every vision-language model does (LLaVA's
# get_placeholder_mask counts the image tokens) is said of the others, by their model type.
_GRID_POSITIONS: Final = ("qwen2_vl", "qwen2_5_vl")
_IMAGE_TOKENS: Final = (
    "a {model_type!r} vision-language model finds where its image features go by the values "
    "of its token ids (the image token's places); fake tensors hold no values"
)


@final
@dataclass(frozen=True)
class ModelShape:
    model_type: str
    config: Mapping[str, Any]
    # Published parameter count, for checking the numbers above against the model card.
    published_params: int | None = None
    notes: str = ""
    kind: ModelKind = "causal-lm"
    # Vision-language: each example carries one image of this many patches (rows, columns),
    # e.g. (32, 32) is a 448x448 image in 14-pixel patches.
    image_patches: tuple[int, int] | None = None

    @property
    def fake_meter_blocker(self) -> str | None:
        if self.kind == "vision-language" and self.model_type not in _GRID_POSITIONS:
            return _IMAGE_TOKENS.format(model_type=self.model_type)
        return FAKE_METER_BLOCKERS[self.kind]


_QWEN2_COMMON: Final = {"vocab_size": 151936, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
# The 7B language model of Qwen2.5-7B and of Qwen2-VL-7B.
_QWEN2_7B: Final = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
}

_LANGUAGE: Final[Mapping[str, ModelShape]] = {
    # A few million parameters: fast enough for every test, big enough that each kind of tensor
    # (embedding, attention, MLP, head) shows in the breakdown.
    "tiny-llama": ModelShape(
        "llama",
        {
            "vocab_size": 2048,
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        notes="test model, about 4M parameters",
    ),
    "qwen2-0.5b": ModelShape(
        "qwen2",
        {
            **_QWEN2_COMMON,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
        published_params=494_032_768,
    ),
    "deepseek-r1-distill-qwen-1.5b": ModelShape(
        "qwen2",
        {
            **_QWEN2_COMMON,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 131072,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
        published_params=1_777_088_000,
    ),
    "llama-7b": ModelShape(
        "llama",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
        published_params=6_738_415_616,
    ),
    "qwen2.5-7b": ModelShape(
        "qwen2",
        {**_QWEN2_COMMON, **_QWEN2_7B, "rope_theta": 1000000.0, "tie_word_embeddings": False},
        published_params=7_615_616_512,
    ),
    "qwen2.5-32b": ModelShape(
        "qwen2",
        {
            **_QWEN2_COMMON,
            "vocab_size": 152064,
            "hidden_size": 5120,
            "intermediate_size": 27648,
            "num_hidden_layers": 64,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        published_params=32_763_876_352,
    ),
    # The QLoRA example of a PEFT explainer article (ms-swift). Model card: 14.8B parameters,
    # 13.2B non-embedding.
    "qwen3-14b": ModelShape(
        "qwen3",
        {
            "vocab_size": 151936,
            "hidden_size": 5120,
            "intermediate_size": 17408,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        published_params=14_768_307_200,
    ),
}


_QWEN2_VL_TOKENS: Final = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

_VISION_LANGUAGE: Final[Mapping[str, ModelShape]] = {
    # Qwen2-VL-shaped, small: a 2-layer vision tower feeding a 2-layer language model.
    "tiny-qwen2-vl": ModelShape(
        "qwen2_vl",
        {
            "text_config": {
                "vocab_size": 2048,
                "hidden_size": 256,
                "intermediate_size": 688,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 2048,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [8, 12, 12],
                },
            },
            "vision_config": {"depth": 2, "embed_dim": 64, "hidden_size": 256, "num_heads": 4},
            "image_token_id": 2001,
            "video_token_id": 2002,
            "vision_start_token_id": 2003,
            "vision_end_token_id": 2004,
        },
        notes="test model, about 2.8M parameters",
        kind="vision-language",
        image_patches=(8, 8),
    ),
    "qwen2-vl-7b": ModelShape(
        "qwen2_vl",
        {
            "text_config": {
                **_QWEN2_7B,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
            },
            "vision_config": {
                "depth": 32,
                "embed_dim": 1280,
                "hidden_size": 3584,
                "num_heads": 16,
                "mlp_ratio": 4,
            },
            **_QWEN2_VL_TOKENS,
        },
        published_params=8_291_375_616,
        kind="vision-language",
        image_patches=(32, 32),
    ),
}


MODELS: Final[Mapping[str, ModelShape]] = {**_LANGUAGE, **_VISION_LANGUAGE}
_MODELS: Final[dict[str, ModelShape]] = MODELS  # type: ignore[assignment]  # writable here only


def enter(name: str, shape: ModelShape) -> None:
    """``shape`` in MODELS under ``name`` for the rest of the process: a model of the user's
    own config (``model_configs.register``), whose key names its content."""
    if name in MODELS and MODELS[name] != shape:
        raise ValueError(f"model {name!r} is already in the zoo with another shape")
    _MODELS[name] = shape


@contextlib.contextmanager
def registered(name: str, shape: ModelShape) -> Iterator[None]:
    """``shape`` in MODELS under ``name`` while the block runs (a config.json given to
    ``pytest-vram estimate``): specs, methods and stages all look shapes up there."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already in the zoo")
    _MODELS[name] = shape
    try:
        yield
    finally:
        del _MODELS[name]


def build_config(name: str) -> PretrainedConfig:
    return checked_config(name, MODELS[name])


def checked_config(name: str, shape: ModelShape) -> PretrainedConfig:
    """The transformers config of ``shape``; a ``SpecError`` naming ``name`` when transformers
    refuses a field, or a value would fail later inside the model."""
    from transformers import AutoConfig

    from pytest_vram.errors import SpecError

    try:
        config = AutoConfig.for_model(shape.model_type, **shape.config)
    except Exception as exc:  # ValueError, TypeError, huggingface_hub's StrictDataclassError
        raise SpecError(f"model {name!r}: {exc}") from None
    # transformers only logs this one; the embedding's padding_idx then fails an assert.
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise SpecError(
            f"model {name!r}: pad_token_id={pad} is outside the vocabulary "
            f"(vocab_size={vocab}); set it below vocab_size or to null"
        )
    return config


def auto_class(name: str) -> Any:
    """The transformers auto class for the shape's kind."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if MODELS[name].kind == "causal-lm" else AutoModelForImageTextToText


def model_class(name: str) -> type[PreTrainedModel]:
    """The model class ``build_model`` builds for the shape (e.g. Gemma2ForCausalLM)."""
    from transformers.models.auto import modeling_auto

    mapping = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
        if MODELS[name].kind == "causal-lm"
        else modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    )
    config = build_config(name)
    if type(config) not in mapping:
        import transformers

        from pytest_vram.errors import SpecError

        what = "causal-LM" if MODELS[name].kind == "causal-lm" else "image-text-to-text"
        raise SpecError(
            f"model {name!r}: model_type {MODELS[name].model_type!r} has no {what} model in "
            f"transformers {transformers.__version__}"
        )
    found: Any = mapping[type(config)]
    if isinstance(found, tuple):  # several classes: from_config's choice, by architectures
        by_name = {c.__name__: c for c in found}
        archs = getattr(config, "architectures", None) or ()
        found = next((by_name[a] for a in archs if a in by_name), found[0])
    cls: type[PreTrainedModel] = found
    return cls


def sdpa_missing(name: str) -> str | None:
    """Why transformers cannot build the shape with sdpa attention, or None when it can. Eager
    attention is every model's; sdpa is the model class's to declare (Gemma2 does not), and
    transformers raises on it only once the model is being built, in a 40-line traceback."""
    cls = model_class(name)
    if cls._supports_sdpa:
        return None
    import transformers

    return f"{cls.__name__} has no sdpa attention in transformers {transformers.__version__}"


def attention_refusal(name: str, attention: str) -> str | None:
    """Why the shape cannot be built with ``attention``, naming the one to use; None if it can."""
    why = sdpa_missing(name) if attention == "sdpa" else None
    return None if why is None else f"model {name!r}: {why}; use attention='eager'"


def build_model(
    name: str, dtype: torch.dtype, device: str | torch.device = "cpu", attention: str = "sdpa"
) -> PreTrainedModel:
    """Random-weight causal LM of the named shape, built directly in ``dtype`` on ``device``,
    with transformers' ``attention`` implementation (sdpa or eager). An attention the model
    does not have is a ``SpecError`` naming the one to use."""
    import torch

    from pytest_vram.errors import SpecError

    refusal = attention_refusal(name, attention)
    if refusal:
        raise SpecError(refusal)
    config = build_config(name)
    auto = auto_class(name)
    with torch.device(device):
        model: PreTrainedModel = auto.from_config(
            config, dtype=dtype, attn_implementation=attention
        )
    return model
