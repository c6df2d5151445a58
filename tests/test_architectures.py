"""The decoder-only architectures people fine-tune, each from a config.json written by its
transformers config class (nothing downloaded), as ``pytest-vram estimate`` takes them.

Each one is traced on the fake meter at a published model's widths (hidden size, heads, vocab,
experts), full and LoRA, through estimate's core; and measured for real on the host meter
shrunk to 2 layers of width 64, where the fake meter must agree with it to the byte. The
published shapes keep 2 of their layers: every layer has the same tensors (both kinds where a
model alternates sliding and full attention), and the layer count is what costs trace time. A
model transformers builds without sdpa attention (Gemma2, gpt-oss) is refused with sdpa, in
one line naming ``attention='eager'``, and runs with eager.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# Imported before any fake trace: a module imported inside the meter would keep fake tensors.
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers

from conftest import TINY_SHAPE
from pytest_vram import SpecError, StepSpec, measure, zoo
from pytest_vram.estimate import estimate, zoo_entry
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.step import run_step


@dataclasses.dataclass(frozen=True)
class Arch:
    config_class: str  # in transformers
    published: Mapping[str, Any]  # whose widths, in the comment beside each
    shrunk: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # beyond SHRUNK
    attention: str = "sdpa"  # what transformers builds it with


SHRUNK: Mapping[str, Any] = TINY_SHAPE
HEAD_16 = {"head_dim": 16}
GEMMA_LAYERS = {"layer_types": ["sliding_attention", "full_attention"]}

ARCHS: Mapping[str, Arch] = {
    "llama": Arch(  # Llama-3.2-1B
        "LlamaConfig",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        },
        HEAD_16,
    ),
    "mistral": Arch(  # Mistral-7B-v0.3
        "MistralConfig",
        {
            "vocab_size": 32768,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "sliding_window": None,
        },
    ),
    "qwen2": Arch(  # Qwen2.5-1.5B
        "Qwen2Config",
        {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3": Arch(  # Qwen3-0.6B
        "Qwen3Config",
        {
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": True,
        },
        HEAD_16,
    ),
    "gemma": Arch(  # gemma-2b
        "GemmaConfig",
        {
            "vocab_size": 256000,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
        },
        HEAD_16,
    ),
    "gemma2": Arch(  # gemma-2-2b: softcapped attention, which transformers has in eager only
        "Gemma2Config",
        {
            "vocab_size": 256000,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            **GEMMA_LAYERS,
        },
        {**HEAD_16, "query_pre_attn_scalar": 16, "sliding_window": 8, **GEMMA_LAYERS},
        attention="eager",
    ),
    "gemma3_text": Arch(  # gemma-3-1b
        "Gemma3TextConfig",
        {
            "vocab_size": 262144,
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 512,
            **GEMMA_LAYERS,
        },
        {**HEAD_16, "query_pre_attn_scalar": 16, "sliding_window": 8, **GEMMA_LAYERS},
    ),
    "phi3": Arch(  # Phi-3-mini-4k-instruct
        "Phi3Config",
        {
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        # Its default pad_token_id (32000) would be outside the shrunk vocabulary.
        {"pad_token_id": None},
    ),
    "mixtral": Arch(  # Mixtral-8x7B
        "MixtralConfig",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": Arch(  # Qwen3-30B-A3B
        "Qwen3MoeConfig",
        {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
        },
        {**HEAD_16, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    ),
    "deepseek_v3": Arch(  # DeepSeek-V3's config class defaults: MLA attention, 256 experts
        "DeepseekV3Config",
        {"first_k_dense_replace": 1},  # layer 0 dense, layer 1 MoE
        {
            # MLA has one key and value head per query head.
            "num_key_value_heads": 4,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "gpt_oss": Arch(  # gpt-oss-20b: attention sinks, which transformers has in eager only
        "GptOssConfig",
        {
            "vocab_size": 201088,
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "sliding_window": 128,
        },
        {**HEAD_16, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
        attention="eager",
    ),
}
# The model classes transformers builds without sdpa, for the refusal's wording.
EAGER_ONLY = {"gemma2": "Gemma2ForCausalLM", "gpt_oss": "GptOssForCausalLM"}
assert set(EAGER_ONLY) == {name for name, arch in ARCHS.items() if arch.attention == "eager"}


@dataclasses.dataclass(frozen=True)
class Entered:
    name: str  # the zoo name of the config.json while the test runs
    key: str  # in ARCHS

    @property
    def arch(self) -> Arch:
        return ARCHS[self.key]


def written(tmp_path: Path, arch: str, small: bool) -> Path:
    """The config.json of ``arch``: published widths on 2 layers, or the shrunk shape."""
    fields = {**SHRUNK, **ARCHS[arch].shrunk} if small else {**ARCHS[arch].published}
    fields.setdefault("num_hidden_layers", 2)
    path = tmp_path / f"{arch}-{'shrunk' if small else 'published'}" / "config.json"
    path.parent.mkdir()
    getattr(transformers, ARCHS[arch].config_class)(**fields).to_json_file(path)
    return path


@pytest.fixture
def model(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Entered]:
    """The parametrized (architecture, shrunk) config.json, entered as estimate enters one."""
    arch, small = request.param
    with zoo_entry(str(written(tmp_path, arch, small))) as name:
        yield Entered(name, arch)


def published(names: Iterable[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "model", [(a, False) for a in names], indirect=True, ids=list(names)
    )


def shrunk(names: Iterable[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "model", [(a, True) for a in names], indirect=True, ids=list(names)
    )


def meta_params(model: Entered) -> int:
    """Parameters of the model transformers builds from the config, counted on meta."""
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            zoo.build_config(model.name), attn_implementation=model.arch.attention
        )
    return sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("method", ["full", "lora"])
@published(ARCHS)
def test_fake_meter_estimates_the_published_widths(model: Entered, method: str) -> None:
    spec = StepSpec(model=model.name, method=method, seq=16, attention=model.arch.attention)
    result = estimate(spec)
    r, b = result.result, result.result.breakdown
    params = meta_params(model)
    assert result.base_params == params
    if method == "full":
        assert r.total_params == r.trainable_params == params
        # bf16, but for what the model keeps in fp32 (DeepSeek-V3's router); a gradient each.
        assert b.grad_bytes == b.param_bytes >= 2 * params
    else:
        assert r.total_params == params + r.trainable_params  # the base and its adapters
        assert 0 < r.trainable_params < params / 50
        # AdamW's two fp32 moments of peft's fp32 adapters (and a 4-byte step per tensor)
        assert b.optimizer_bytes == pytest.approx(8 * r.trainable_params, rel=0.001)
    assert b.activation_bytes > 0


@shrunk(ARCHS)
def test_host_meter_measures_the_shrunk_model_as_the_fake_meter_traces_it(model: Entered) -> None:
    spec = StepSpec(model=model.name, seq=16, attention=model.arch.attention)
    host = measure(spec, "host")  # a real step: random weights, real tensors
    assert host.total_params == meta_params(model)
    fake = run_step(spec, FakeMeter())
    assert (fake.peak_bytes, fake.breakdown) == (host.peak_bytes, host.breakdown)


@pytest.mark.parametrize("meter", ["host", "fake"])
@shrunk(EAGER_ONLY)
def test_sdpa_is_refused_in_one_line_naming_eager(model: Entered, meter: str) -> None:
    with pytest.raises(SpecError) as refused:
        measure(StepSpec(model=model.name, method="lora"), meter)  # sdpa, the default
    assert str(refused.value) == (
        f"model {model.name!r}: {EAGER_ONLY[model.key]} has no sdpa attention in transformers "
        f"{transformers.__version__}; use attention='eager'"
    )
