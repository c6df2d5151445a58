"""The zoo's real shapes match the published parameter counts (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SHAPE
from pytest_vram import zoo


@pytest.mark.parametrize("name", [n for n, s in zoo.MODELS.items() if s.published_params])
def test_parameter_count_matches_the_model_card(name: str) -> None:
    model = zoo.build_model(name, torch.bfloat16, device="meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == zoo.MODELS[name].published_params


def test_tiny_llama_is_small_and_real() -> None:
    model = zoo.build_model("tiny-llama", torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_importing_the_zoo_does_not_import_torch_eagerly() -> None:
    import subprocess
    import sys

    # The modules that decide, at collection, what runs where: methods' facts and meter limits.
    modules = "pytest_vram.zoo, pytest_vram.spec, pytest_vram.plugin, pytest_vram.meters.limits"
    code = f"import sys, {modules}, pytest_vram.references; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_model_kind_says_whether_the_fake_meter_traces_it() -> None:
    from typing import get_args

    assert set(zoo.FAKE_METER_BLOCKERS) == set(get_args(zoo.ModelKind))
    assert zoo.MODELS["tiny-llama"].fake_meter_blocker is None
    reason = zoo.MODELS["tiny-qwen2-vl"].fake_meter_blocker
    assert reason == zoo.FAKE_METER_BLOCKERS["vision-language"]
    assert reason and "get_vision_position_ids" in reason


GEMMA2 = zoo.ModelShape(
    "gemma2",
    {**TINY_SHAPE, "head_dim": 16, "query_pre_attn_scalar": 16},
    notes="test shape: Gemma2 has no sdpa attention in transformers",
)


def test_every_model_build_takes_the_steps_attention() -> None:
    """Gemma2 builds with eager only. The estimate's parameter count used to build it with
    sdpa whatever the step's attention was; a model without it is refused in one line."""
    from pytest_vram import SpecError
    from pytest_vram.estimate import base_params

    with zoo.registered("gemma2-test", GEMMA2):
        total, largest = base_params("gemma2-test", "eager")
        assert total == sum(
            p.numel()
            for p in zoo.build_model("gemma2-test", torch.bfloat16, "meta", "eager").parameters()
        )
        assert largest == 512 * 64  # the embedding, tied to the head
        with pytest.raises(SpecError, match=r"^model 'gemma2-test': Gemma2ForCausalLM has no sdpa"):
            base_params("gemma2-test")
        with pytest.raises(SpecError, match=r"; use attention='eager'$"):
            zoo.build_model("gemma2-test", torch.bfloat16, "meta", "sdpa")
        assert zoo.sdpa_missing("tiny-llama") is None


def test_qlora_loads_its_quantized_base_with_the_steps_attention() -> None:
    """The host meter's QLoRA saves a random model and loads it back quantized: the attention
    is not in the saved config, and from_pretrained picked sdpa when the step asked eager."""
    from pytest_vram.methods import METHODS
    from pytest_vram.spec import StepSpec

    spec = StepSpec(model="tiny-llama", method="qlora", attention="eager")
    model = METHODS["qlora"].build_model(spec, torch.bfloat16, "cpu")
    assert model.config._attn_implementation == "eager"
