"""Hugging Face ``Trainer`` and TRL under ``vram.measure``.

A trainer's loop calls ``optimizer.step()`` and then ``model.zero_grad()``; measured as one
function, the gradients are gone when it returns, and the breakdown files them as activations
and temporaries. ``VramCallback`` ends a measured step where the gradients and the optimizer
state are both still held, as the built-in step does::

    def one_step(path):
        trainer = SFTTrainer(..., callbacks=[VramCallback()])
        trainer.train()
        return trainer.model

    def test_sft(vram):
        vram.measure(one_step, "recipes/sft.yaml")

Outside ``vram.measure`` the callback does nothing, so a training script can keep it.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

import pytest_vram

__all__ = ["VramCallback", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer whose ``state`` holds the tensors: accelerate wraps the trainer's
    optimizer (``AcceleratedOptimizer.optimizer``), and may wrap it once more for DeepSpeed."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class VramCallback(TrainerCallback):
    """Marks each optimizer step of a ``transformers.Trainer`` (and so of TRL's trainers).

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before ``model.zero_grad()``
    (transformers' ``Trainer._inner_training_loop``), once per optimizer step, so with gradient
    accumulation a measured step is what one optimizer step holds."""

    def on_optimizer_step(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        pytest_vram.mark_step(model, unwrap_optimizer(optimizer))
