"""Training code as users write it, for ``test_user_stacks.py``: a Hugging Face Trainer run with
a DeepSpeed config as LLaMA-Factory ships it, and a loop of one's own around
``deepspeed.initialize``. Each runs under ``vram.measure(..., ranks=2)``, one process per rank
with the environment torchrun gives, and starts the process group itself.

Nothing is downloaded: the model is built with random weights from its config.json
(``data/models/tiny-qwen2``), the tokenizer and the data are made on the spot. torch is imported
inside the functions, which run in the plugin's worker: the pytest process stays light.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest_vram

if TYPE_CHECKING:
    import torch

DATA: Final = Path(__file__).parent / "data"
MODEL: Final = DATA / "models" / "tiny-qwen2"
LLAMA_FACTORY: Final = DATA / "llama_factory"
BATCH: Final = 2  # per rank
SEQ: Final = 64
STEPS: Final = 2
ROWS: Final = 16  # enough for STEPS steps of BATCH on every rank
HIDDEN_SIZE: Final = 256  # the config.json's


def lora_model() -> torch.nn.Module:
    """The config.json's model in bf16 with LoRA on every linear layer, as LLaMA-Factory's
    ``finetuning_type: lora`` with ``lora_target: all`` builds it. Under a ZeRO-3 config the
    Trainer's arguments are made first, so transformers builds it partitioned (``zero.Init``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def vocab_size() -> int:
    from transformers import AutoConfig

    size: int = AutoConfig.from_pretrained(MODEL).vocab_size
    return size


def trainer_step(deepspeed_config: str) -> torch.nn.Module:
    """LLaMA-Factory's SFT stage in miniature: Trainer, LoRA, bf16 and one of its DeepSpeed
    JSON files as written (``"auto"`` values filled in by transformers)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from pytest_vram import local_data
    from pytest_vram.integrations import VramCallback

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        import deepspeed

        # On a GPU, TrainingArguments starts DeepSpeed's communication (accelerate's DeepSpeed
        # branch); use_cpu skips that branch, and zero.Init would then see one rank.
        deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            deepspeed=str(LLAMA_FACTORY / deepspeed_config),
            bf16=True,
            use_cpu=not on_gpu,
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-4,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        # Starts the process group (accelerate's PartialState), as LLaMA-Factory does when it
        # logs each rank's device: zero.Init then partitions the model over both ranks.
        args.device  # noqa: B018
        trainer = Trainer(
            model=lora_model(),
            args=args,
            train_dataset=local_data.token_rows(ROWS, SEQ, vocab_size()),
            callbacks=[VramCallback()],
        )
        trainer.train()
        model: torch.nn.Module = trainer.model
        return model


def deepspeed_config(offload: bool) -> dict[str, Any]:
    """A ZeRO-3 config as one writes it for one's own loop: no "auto" (nothing fills it in),
    so the buckets are sized here as transformers sizes "auto" (from the hidden size). Left
    out, DeepSpeed's defaults (5e8 elements) allocate a 1 GB gradient bucket per rank."""
    hidden = HIDDEN_SIZE
    zero: dict[str, Any] = {
        "stage": 3,
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        # A torch optimizer under optimizer offload: DeepSpeed refuses it unless told.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }


def deepspeed_step(offload: bool) -> torch.nn.Module:
    """A training loop of one's own around ``deepspeed.initialize``, as the deepspeed launcher
    or torchrun runs it; each optimizer step is marked (``pytest_vram.mark_step``)."""
    import deepspeed
    import torch

    from pytest_vram import local_data

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    model = lora_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(offload)
    )
    rank = torch.distributed.get_rank()
    rows = local_data.token_rows(ROWS, SEQ, vocab_size(), seed=rank * ROWS)
    for step in range(STEPS):
        ids = torch.tensor(rows[step * BATCH : (step + 1) * BATCH]["input_ids"])
        ids = ids.to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        pytest_vram.mark_step()
    module: torch.nn.Module = engine.module
    return module
