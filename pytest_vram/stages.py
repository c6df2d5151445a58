"""Training stages: what one step computes its loss from.

``sft``: causal-LM loss on a random token batch. ``dpo``: the policy and a frozen reference on a
chosen and a rejected sequence per example, and the DPO loss on their log-probabilities (TRL's
``selective_log_softmax``, as its DPOTrainer computes them). With a peft model the reference is
the policy with its adapters disabled, as TRL does when ``ref_model`` is None; otherwise it is a
second, frozen copy of the base model, which is what such a run holds in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import torch

from pytest_vram.methods import METHODS
from pytest_vram.spec import StepSpec

__all__ = ["STAGES", "Dpo", "Sft"]

DPO_BETA: Final = 0.1


class Sft:
    def __init__(self, model: torch.nn.Module, spec: StepSpec, device: str) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.vocab: int = model.config.vocab_size  # type: ignore[union-attr, assignment]
        self.gen = torch.Generator().manual_seed(spec.seed)

    def tokens(self, batch: int) -> torch.Tensor:
        shape = (batch, self.spec.seq)
        return torch.randint(self.vocab, shape, generator=self.gen).to(self.device)

    def frozen_models(self) -> list[torch.nn.Module]:
        """Models besides the trained one whose weights the step holds."""
        return []

    def loss(self) -> torch.Tensor:
        ids = self.tokens(self.spec.batch)
        loss: torch.Tensor = self.model(input_ids=ids, labels=ids).loss
        return loss


class Dpo(Sft):
    def __init__(self, model: torch.nn.Module, spec: StepSpec, device: str) -> None:
        super().__init__(model, spec, device)
        from trl.trainer.utils import selective_log_softmax

        self.selective_log_softmax = selective_log_softmax
        self.reference: torch.nn.Module | None = None
        if not hasattr(model, "disable_adapter"):
            method = METHODS[spec.method]
            dtype = next(model.parameters()).dtype
            self.reference = method.build_model(spec, dtype, device)
            self.reference.requires_grad_(False).eval()

    def frozen_models(self) -> list[torch.nn.Module]:
        return [self.reference] if self.reference is not None else []

    def _logps(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        logps: torch.Tensor = self.selective_log_softmax(logits, ids[:, 1:]).sum(-1)
        return logps

    def _reference_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.reference is None:
            return self.model.disable_adapter()  # type: ignore[operator, no-any-return]
        return contextlib.nullcontext()

    def loss(self) -> torch.Tensor:
        # Chosen then rejected, concatenated into one batch as TRL does.
        ids = self.tokens(2 * self.spec.batch)
        policy = self._logps(self.model, ids)
        with torch.no_grad(), self._reference_context():
            ref = self._logps(self.reference or self.model, ids)
        pi_c, pi_r = policy.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        margin = DPO_BETA * ((pi_c - ref_c) - (pi_r - ref_r))
        return -torch.nn.functional.logsigmoid(margin).mean()


STAGES: Final[Mapping[str, Callable[[torch.nn.Module, StepSpec, str], Sft]]] = {
    "sft": Sft,
    "dpo": Dpo,
}
