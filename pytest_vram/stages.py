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

from pytest_vram import zoo
from pytest_vram.errors import SpecError
from pytest_vram.methods import METHODS
from pytest_vram.spec import StepSpec

__all__ = ["STAGES", "Dpo", "Sft"]

DPO_BETA: Final = 0.1


class Sft:
    def __init__(
        self,
        model: torch.nn.Module,
        spec: StepSpec,
        device: str,
        forward: Callable[..., Any] | None = None,
    ) -> None:
        self.model = model
        # What the batch goes through: the model, or the DeepSpeed engine around it.
        self.forward = forward or model
        self.spec = spec
        self.device = device
        config: Any = model.config
        self.config = config
        self.vocab: int = getattr(config, "text_config", config).vocab_size
        self.shape = zoo.MODELS[spec.model]
        self.gen = torch.Generator().manual_seed(spec.seed)
        if self.shape.image_patches is not None:
            rows, cols = self.shape.image_patches
            merge = config.vision_config.spatial_merge_size
            self.image_tokens = rows * cols // merge**2
            if spec.seq < self.image_tokens + 3:
                raise SpecError(
                    f"seq={spec.seq} is too short for {spec.model}: its image alone takes "
                    f"{self.image_tokens} tokens plus 2 markers; use seq >= {self.image_tokens + 3}"
                )

    def frozen_models(self) -> list[torch.nn.Module]:
        """Models besides the trained one whose weights the step holds."""
        return []

    def inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """Random tokens; for a vision-language model one image per example, up front."""
        ids = torch.randint(self.vocab, (batch, self.spec.seq), generator=self.gen)
        inputs = {"input_ids": ids}
        if self.shape.image_patches is not None:
            inputs.update(self._image(ids))
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _image(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.shape.image_patches is not None
        rows, cols = self.shape.image_patches
        c = self.config
        vision = c.vision_config
        n = self.image_tokens
        ids[:, 0] = c.vision_start_token_id
        ids[:, 1 : 1 + n] = c.image_token_id
        ids[:, 1 + n] = c.vision_end_token_id
        kinds = torch.zeros_like(ids)
        kinds[:, 1 : 1 + n] = 1  # text 0, image 1
        batch = ids.shape[0]
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(batch * rows * cols, patch, generator=self.gen)
        return {
            "pixel_values": pixels.to(next(self.model.parameters()).dtype),
            "image_grid_thw": torch.tensor([[1, rows, cols]] * batch),
            "mm_token_type_ids": kinds,
        }

    def batch(self) -> dict[str, torch.Tensor]:
        """One step's inputs; the caller holds them for the whole step, as a trainer loop does."""
        return self.inputs(self.spec.batch)

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = inputs["input_ids"].clone()
        if "mm_token_type_ids" in inputs:
            labels[inputs["mm_token_type_ids"] != 0] = -100  # no loss on image tokens
        loss: torch.Tensor = self.forward(**inputs, labels=labels).loss
        return loss


class Dpo(Sft):
    def __init__(
        self,
        model: torch.nn.Module,
        spec: StepSpec,
        device: str,
        forward: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(model, spec, device, forward)
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

    def _logps(self, model: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = inputs["input_ids"]
        # Prompt learning prepends virtual tokens to the logits: keep the input's positions.
        logits = model(**inputs).logits[:, -ids.size(1) : -1]
        logps: torch.Tensor = self.selective_log_softmax(logits, ids[:, 1:]).sum(-1)
        return logps

    def _reference_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.reference is None:
            return self.model.disable_adapter()  # type: ignore[operator, no-any-return]
        return contextlib.nullcontext()

    def batch(self) -> dict[str, torch.Tensor]:
        # Chosen then rejected, concatenated into one batch as TRL does.
        return self.inputs(2 * self.spec.batch)

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = self._logps(self.forward, inputs)
        with torch.no_grad(), self._reference_context():
            ref = self._logps(self.reference or self.model, inputs)
        pi_c, pi_r = policy.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        margin = DPO_BETA * ((pi_c - ref_c) - (pi_r - ref_r))
        return -torch.nn.functional.logsigmoid(margin).mean()


STAGES: Final[Mapping[str, type[Sft]]] = {
    "sft": Sft,
    "dpo": Dpo,
}
