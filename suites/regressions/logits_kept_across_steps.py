"""Each step's logits kept for metrics: memory that grows from step to step.

Imitates pnnl/neuromancer#292 "Fixing leaking autograd graph memory in Trainer" ("we're not
detaching the grad graphs from the metrics before we store them") and
BatsResearch/labelmodels#4 "Memory leak in training loop" (a running loss summed from
non-detached tensors); the symptom of huggingface/transformers#26284 "GPU memory isn't freed
while using trainer. GPU runs out of memory and throws OOM" (usage increasing every step).

The mechanism: a forward hook on the causal LM, as a metrics callback registers it, appends each
step's output logits to a list "for the epoch's metrics": every step's logits stay alive, so
every step peaks higher than the one before.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

KEPT: list[torch.Tensor] = []
_post_init = PreTrainedModel.post_init


def _keep_logits(module: Any, args: Any, output: Any) -> None:
    logits = getattr(output, "logits", None)
    if module.training and logits is not None:
        KEPT.append(logits)  # the bug: neither detached nor dropped after the metric


def post_init(self: Any) -> None:
    _post_init(self)
    if self.get_output_embeddings() is not None:  # a model with an LM head
        self.register_forward_hook(_keep_logits)


PreTrainedModel.post_init = post_init
