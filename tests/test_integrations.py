"""VramCallback: a Hugging Face Trainer (and TRL's trainers) measured with its steps marked.

Each test trains tiny-llama (random weights, fp32) for two optimizer steps on the host meter,
in this process, with a tokenizer and dataset made here: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from pytest_vram import local_data, zoo  # noqa: E402
from pytest_vram.integrations import VramCallback  # noqa: E402
from pytest_vram.meters.host import HostMeter  # noqa: E402
from pytest_vram.result import MemoryResult  # noqa: E402
from pytest_vram.user_step import measure_fn  # noqa: E402

F32 = 4
VOCAB = 2048  # tiny-llama's
SEQ = 32
STEPS = 2


def text(seed: int, words: int) -> str:
    return local_data.texts(1, words, VOCAB, seed)[0]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build_model("tiny-llama", torch.float32)


def arguments(out: Path, **extra: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def trainer_step(out: Path, marked: bool, lora: bool = False) -> torch.nn.Module:
    net = model()
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=8, target_modules="all-linear"))
    data = local_data.token_rows(8, SEQ, VOCAB)
    trainer = Trainer(
        model=net,
        args=TrainingArguments(**arguments(out)),
        train_dataset=data,
        callbacks=[VramCallback()] if marked else [],
    )
    trainer.train()
    return net


def trainable_bytes(result: MemoryResult) -> int:
    return F32 * result.trainable_params


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> MemoryResult:
    return measure_fn(trainer_step, (tmp_path_factory.mktemp("full"), True), {}, HostMeter())


def test_trainer_full_marks_each_optimizer_step(marked: MemoryResult) -> None:
    b = marked.breakdown
    # Every parameter trains in fp32: its gradient and AdamW's two moments are held at the peak.
    assert marked.trainable_params == marked.total_params > 0
    assert b.grad_bytes == trainable_bytes(marked)
    assert b.optimizer_bytes >= 2 * trainable_bytes(marked)
    assert len(marked.step_peak_bytes) >= STEPS  # a window per optimizer step, then the tail


def test_trainer_without_the_callback_files_gradients_as_activations(
    tmp_path: Path, marked: MemoryResult
) -> None:
    unmarked = measure_fn(trainer_step, (tmp_path, False), {}, HostMeter())
    # zero_grad ran before the function returned: the roles are read without gradients.
    assert unmarked.breakdown.grad_bytes == 0 < marked.breakdown.grad_bytes
    assert len(unmarked.step_peak_bytes) == 1
    assert unmarked.breakdown.activation_bytes > marked.breakdown.activation_bytes


def test_trainer_lora_counts_only_the_adapters(tmp_path: Path) -> None:
    result = measure_fn(trainer_step, (tmp_path, True), {"lora": True}, HostMeter())
    b = result.breakdown
    assert 0 < result.trainable_params < result.total_params // 10
    assert b.param_bytes == F32 * result.total_params
    # AdamW's two moments of the adapters, plus a 0-d step count per adapter tensor.
    moments = 2 * trainable_bytes(result)
    assert moments <= b.optimizer_bytes <= moments + 8 * 1024
    # The adapters' gradients are small and arrive late in backward, after the peak of
    # activations: at the peak only the frozen weights, the state and the activations live.
    assert b.grad_bytes == 0
    assert len(result.step_peak_bytes) >= STEPS
    assert b.activation_bytes > b.optimizer_bytes


def trl_step(trainer: str, config: str, out: Path, data: Dataset, **extra: Any) -> Any:
    """Two steps of a TRL trainer on tiny-llama, with the callback; the trained model."""
    trl = pytest.importorskip("trl")
    run = getattr(trl, trainer)(
        model=model(),
        args=getattr(trl, config)(**arguments(out, max_length=SEQ)),
        train_dataset=data,
        processing_class=local_data.word_tokenizer(VOCAB),
        callbacks=[VramCallback()],
        **extra,
    )
    run.train()
    return run.model


def sft_step(out: Path) -> torch.nn.Module:
    data = Dataset.from_dict({"text": [text(i, SEQ) for i in range(8)]})
    return trl_step("SFTTrainer", "SFTConfig", out, data)


def dpo_step(out: Path) -> torch.nn.Module:
    data = Dataset.from_dict(
        {
            "prompt": [text(i, 8) for i in range(8)],
            "chosen": [text(100 + i, 8) for i in range(8)],
            "rejected": [text(200 + i, 8) for i in range(8)],
        }
    )
    return trl_step("DPOTrainer", "DPOConfig", out, data, ref_model=model())


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> MemoryResult:
    return measure_fn(sft_step, (tmp_path_factory.mktemp("sft"),), {}, HostMeter())


def test_trl_sft_trainer_steps_are_marked(sft: MemoryResult) -> None:
    assert sft.breakdown.grad_bytes == trainable_bytes(sft) > 0
    assert sft.breakdown.optimizer_bytes >= 2 * trainable_bytes(sft)
    assert len(sft.step_peak_bytes) >= STEPS


def test_trl_dpo_trainer_holds_the_reference_model(tmp_path: Path, sft: MemoryResult) -> None:
    dpo = measure_fn(dpo_step, (tmp_path,), {}, HostMeter())
    b = dpo.breakdown
    assert len(dpo.step_peak_bytes) >= STEPS
    # AdamW's state of step 1 is held through step 2, whose peak holds gradients: all of them
    # when it is the optimizer step's, part of them when it falls in backward (which of the
    # two depends on how long the tokenized pairs are).
    assert b.optimizer_bytes >= 2 * trainable_bytes(dpo)
    assert 0 < b.grad_bytes <= trainable_bytes(dpo)
    # The frozen reference is a second copy of the weights; only the trained model is a role,
    # so the copy counts as activations and temporaries, and lifts the peak above SFT's.
    assert b.activation_bytes >= F32 * dpo.total_params
    assert dpo.peak_bytes - sft.peak_bytes >= F32 * dpo.total_params
