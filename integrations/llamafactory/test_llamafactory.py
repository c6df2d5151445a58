"""LLaMA-Factory's own SFT recipes, run by LLaMA-Factory under ``vram.measure``.

Only in the ``llamafactory`` tox env (README.md beside this file): LLaMA-Factory 0.9.5 pins
trl<=0.24, below pytest-vram's ``dpo`` extra, so it cannot share the test env. Elsewhere these
tests skip. The model is a tiny Qwen3 with random weights and the data is made on the spot
(``lf_recipe``); the recipes are LLaMA-Factory's example files as it ships them.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from pytest_vram.fixture import Recorder
    from pytest_vram.result import MemoryResult

pytest.importorskip("llamafactory", reason="needs LLaMA-Factory: tox -e llamafactory")

import lf_recipe  # noqa: E402  (imports LLaMA-Factory)

MiB = 2**20
# Qwen3 LoRA, rank 8 on every linear layer of the tiny model (lf_recipe.TINY_QWEN3).
LORA_PARAMS = 149_504
FP32 = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local model and datasets, made once, outside the measured window."""
    return str(lf_recipe.make_workdir(tmp_path_factory.mktemp("llamafactory")))


def report(name: str, result: MemoryResult) -> None:
    """Each rank's peaks and breakdown, for ``-s`` runs."""
    rows = result.ranks or (result,)
    for i, r in enumerate(rows):
        b = r.breakdown
        print(
            f"{name} rank {i}: peak {r.peak_bytes / MiB:.2f} MiB, steps "
            f"{[round(p / MiB, 2) for p in r.step_peak_bytes]} MiB; params "
            f"{b.param_bytes / MiB:.2f}, grads {b.grad_bytes / MiB:.2f}, optimizer "
            f"{b.optimizer_bytes / MiB:.2f}, activations {b.activation_bytes / MiB:.2f} MiB"
        )


@pytest.mark.vram_budget(gb=0.25)
def test_the_lora_sft_recipe(vram: Recorder, workdir: str) -> None:
    """``examples/train_lora/qwen3_lora_sft.yaml`` through ``run_exp``: each optimizer step (8
    micro-batches of gradient accumulation) ends where ``VramCallback`` marks it, and the
    second one's peak holds the adapters' gradients and AdamW state."""
    result = vram.measure(lf_recipe.sft_step, str(lf_recipe.SFT), workdir)
    report("qwen3_lora_sft", result)
    assert len(result.step_peak_bytes) == lf_recipe.STEPS, "VramCallback marked each step"
    assert result.trainable_params == LORA_PARAMS
    b = result.breakdown
    # The adapters in fp32 (LLaMA-Factory upcasts trainable weights), their gradients and
    # AdamW's two moments; the frozen weights in bf16.
    assert b.grad_bytes == LORA_PARAMS * FP32
    assert b.optimizer_bytes >= 2 * LORA_PARAMS * FP32
    assert b.param_bytes > LORA_PARAMS * FP32


@pytest.mark.vram_budget(gb=0.25)
def test_the_lora_sft_zero3_recipe_on_two_ranks(vram: Recorder, workdir: str) -> None:
    """``examples/train_lora/qwen3_lora_sft_ds3.yaml`` with its ``ds_z3_config.json``, on two
    ranks with torchrun's environment: DeepSpeed's ZeRO-3 engine, built by the Trainer inside
    LLaMA-Factory, is accounted per rank, and the config it ran with has every "auto" filled."""
    pytest.importorskip("deepspeed", reason="the ZeRO-3 recipe needs pytest-vram[zero]")
    result = vram.measure(lf_recipe.sft_step, str(lf_recipe.SFT_DS3), workdir, ranks=2)
    report("qwen3_lora_sft_ds3", result)
    assert len(result.ranks) == 2
    ran = result.zero_config
    assert ran is not None and ran["zero_optimization"]["stage"] == 3
    assert "auto" not in str(ran)
    for rank in result.ranks:
        assert len(rank.step_peak_bytes) == lf_recipe.STEPS
        assert rank.breakdown.optimizer_bytes > 0


def test_the_recipes_are_the_installed_releases() -> None:
    """Each recipe is LLaMA-Factory's file below a header naming its release, the one that
    runs it here; ``recipe`` changes only the keys ``lf_recipe`` names."""
    assert version("llamafactory") == "0.9.5", "re-transcribe the recipes from this release"
    for path in (lf_recipe.SFT, lf_recipe.SFT_DS3):
        text = Path(path).read_text(encoding="utf-8")
        assert "hiyouga/LLaMA-Factory, release 0.9.5" in text
        shipped = yaml.safe_load(text)
        args = lf_recipe.recipe(path, Path("/nowhere"))
        changed = {k for k in args if args[k] != shipped.get(k)}
        allowed = set(lf_recipe.local_keys(Path("/nowhere"))) | set(lf_recipe.short_run_keys())
        assert changed <= allowed | {"deepspeed"}
        assert args["stage"] == "sft" and args["finetuning_type"] == "lora"
        assert args["max_steps"] == lf_recipe.STEPS and args["report_to"] == "none"
