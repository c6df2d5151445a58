"""User stacks under a budget: training code as users write it, on two ranks, with the
configuration files they ship.

LLaMA-Factory users measured 188.8 GB of GPU memory for LoRA on 8 GPUs under ZeRO-3 with
everything offloaded, where the run without offload took 75.4 GB (Juejin article, 2025). That
run went through LLaMA-Factory's trainer, a Hugging Face ``Trainer``, with its
``ds_z3_offload_config.json``. Here the same pair of configs, as LLaMA-Factory ships them
(``data/llama_factory``), runs through a ``Trainer`` on two ranks, and a loop of one's own
around ``deepspeed.initialize`` does the same; per rank, offload must not raise device memory,
and what it moves is counted as host memory. The model of every case is a config.json
(``data/models/tiny-qwen2``), built with random weights.

Budgets are 0.25 GiB though no host peak here reaches 30 MiB, sized for the GPU as in
``test_zero.py``.
"""

from __future__ import annotations

import json

import pytest
import user_stacks

pytest.importorskip("deepspeed", reason="ZeRO cases need pytest-vram[zero]")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

pytestmark = pytest.mark.vram_budget(gb=0.25)

Z3 = "ds_z3_config.json"
Z3_OFFLOAD = "ds_z3_offload_config.json"


def test_llama_factory_zero3_offload_through_the_trainer(vram) -> None:
    offloaded = vram.measure(user_stacks.trainer_step, Z3_OFFLOAD, ranks=2)
    plain = vram.measure(user_stacks.trainer_step, Z3, ranks=2)
    vram.assert_lt(offloaded, plain)  # on every rank
    assert offloaded.host_offload_bytes > 0 == plain.host_offload_bytes
    for rank in offloaded.ranks:
        # offload_param: the partitions live on the host; offload_optimizer: all of the state
        assert rank.breakdown.param_bytes == rank.breakdown.optimizer_bytes == 0
    for rank in plain.ranks:
        assert rank.breakdown.optimizer_bytes > 0 and rank.breakdown.grad_bytes > 0
    # What DeepSpeed ran with: the file as written, "auto" filled in by transformers.
    ran = offloaded.zero_config
    assert ran is not None and "auto" not in json.dumps(ran)
    assert ran["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ran["train_micro_batch_size_per_gpu"] == user_stacks.BATCH
    print("LLAMA-FACTORY Z3 OFFLOAD RAN WITH", json.dumps(ran, sort_keys=True))


def test_own_deepspeed_loop_offload_counts_as_host_memory(vram) -> None:
    offloaded = vram.measure(user_stacks.deepspeed_step, True, ranks=2)
    plain = vram.measure(user_stacks.deepspeed_step, False, ranks=2)
    vram.assert_le(offloaded, plain)
    assert [r.breakdown.optimizer_bytes for r in offloaded.ranks] == [0, 0]
    assert all(r.host_offload_bytes > 0 for r in offloaded.ranks)
    assert plain.host_offload_bytes == 0


def test_the_config_json_model_through_the_built_in_step(vram) -> None:
    """The same config.json as a step's model, under LLaMA-Factory's ZeRO-3 config: the
    settings that ran are in the result, every "auto" filled in."""

    def step(config: str):
        path = str(user_stacks.LLAMA_FACTORY / config)
        model = str(user_stacks.MODEL)
        return vram.step(model=model, method="lora", batch=2, seq=64, deepspeed=path, ranks=2)

    offloaded, plain = step(Z3_OFFLOAD), step(Z3)
    vram.assert_lt(offloaded, plain)
    assert offloaded.zero_config is not None and "auto" not in json.dumps(offloaded.zero_config)
    assert offloaded.label.startswith("tiny-qwen2@")
