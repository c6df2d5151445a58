"""The shipped vertical-slice matrix on tiny-llama: method x optimizer x precision.

Each case runs two real training steps in an isolated child under the selected meter and is
checked against its budget and the committed baseline of this device.

Budgets are 0.25 GiB though no host peak here reaches 80 MiB: they are sized for the GPU, whose
reserved peak adds the cuBLAS workspace, foreach AdamW's temporaries and the caching
allocator's segment rounding (README, "The shipped suite on a GPU").
"""

from __future__ import annotations

import pytest

from pytest_vram import MemoryResult

METHODS = ("full", "freeze", "lora")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", batch=2, seq=128)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_step(vram, method: str, optimizer: str, precision: str) -> None:
    r: MemoryResult = vram.step(method=method, optimizer=optimizer, precision=precision)
    b = r.breakdown
    assert b.total_bytes == r.peak_bytes
    if optimizer == "sgd":  # no momentum: SGD keeps no state
        assert b.optimizer_bytes == 0
    if method != "full":
        assert r.trainable_params < r.total_params


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", method="lora", batch=2, seq=128)
def test_grad_ckpt_saves_activations(vram) -> None:
    plain = vram.step()
    ckpt = vram.step(grad_ckpt=True)
    assert ckpt.breakdown.activation_bytes < plain.breakdown.activation_bytes
