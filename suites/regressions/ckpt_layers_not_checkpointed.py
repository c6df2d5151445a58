"""transformers gradient checkpointing that silently does nothing.

Imitates huggingface/trl#876 "trl v0.7.2 is causing CUDA out of memory for Mistral Instruct on
A100 GPU" (checkpointing stopped being applied and runs went out of memory, with no error) and
the frozen-embedding cases of huggingface/transformers#21381 "gradient checkpointing disables
requires_grad when freezing part of models": checkpointing that is asked for, reported as on,
and not applied.

The mechanism: ``_set_gradient_checkpointing`` flags only the top-level model (as for models
that checkpoint themselves) and no longer the decoder layers, so ``model.is_gradient_checkpointing``
is True while every layer keeps its activations for the backward.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

_set = PreTrainedModel._set_gradient_checkpointing


def _set_gradient_checkpointing(self: Any, enable: bool = True, *args: Any, **kwargs: Any) -> None:
    _set(self, enable, *args, **kwargs)
    for module in self.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = False  # the bug: the layers are not flagged


PreTrainedModel._set_gradient_checkpointing = _set_gradient_checkpointing
