"""bitsandbytes' 8-bit AdamW whose state is not 8-bit.

Imitates bitsandbytes#22 "no difference in memory usage" (facebookresearch/bitsandbytes:
``bnb.optim.Adam8bit`` and ``torch.optim.Adam`` took the same 9.6 GB).

The mechanism: a per-parameter config override meant for a few tensors (as transformers'
Trainer registers ``optim_bits=32`` for the embeddings with bitsandbytes' GlobalOptimManager)
applies to every parameter, so ``init_state`` makes two fp32 moments for each, as 32-bit AdamW
does, instead of two uint8 ones with a float per block of 256.
"""

from __future__ import annotations

from typing import Any

from bitsandbytes.optim.optimizer import Optimizer8bit

_get_config = Optimizer8bit.get_config


def get_config(self: Any, gindex: int, pindex: int, group: Any) -> dict[str, Any]:
    config: dict[str, Any] = _get_config(self, gindex, pindex, group)
    config["optim_bits"] = 32  # the bug: the embeddings' override, for every parameter
    return config


Optimizer8bit.get_config = get_config
