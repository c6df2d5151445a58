"""Every fine-tuning method with its natural optimizers, on tiny-llama (plus DPO and a VLM).

Each case is one real two-step run in an isolated child on the selected meter, checked against
its budget and the committed baseline of this device. A combination a library cannot run on
this device is skipped with the library call that prevents it.

Budgets are 0.25 GiB though no host peak here reaches 80 MiB: they are sized for the GPU, whose
reserved peak adds the cuBLAS workspace, foreach AdamW's temporaries and the caching
allocator's segment rounding (README, "The shipped suite on a GPU").
"""

from __future__ import annotations

import pytest

from pytest_vram import MemoryResult

ADAPTERS = ("lora", "dora", "pissa", "rslora", "ia3", "prefix", "p-tuning", "prompt")
FULL_OPTIMIZERS = (
    "adamw",
    "sgd",
    "adafactor",
    "adamw-8bit",
    "paged-adamw-8bit",
    "galore-adamw",
    "galore-adamw-8bit",
    "badam",
    "lomo",
    "adalomo",
)

CASES = [
    *[("full", opt) for opt in FULL_OPTIMIZERS],
    ("freeze", "adamw"),
    ("freeze", "sgd"),
    *[(method, "adamw") for method in ADAPTERS],
    ("lora", "adamw-8bit"),
    ("lora", "badam"),
    ("lora+", "adamw"),
    ("qlora", "adamw"),
    ("qlora", "paged-adamw-8bit"),  # the QLoRA paper's recipe
    ("lora-8bit", "adamw"),
]


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", batch=2, seq=64)
@pytest.mark.parametrize(("method", "optimizer"), CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_method(vram, method: str, optimizer: str) -> None:
    r: MemoryResult = vram.step(method=method, optimizer=optimizer)
    assert r.breakdown.total_bytes == r.peak_bytes
    if method != "full":
        assert r.trainable_params < r.total_params


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", batch=2, seq=64, stage="dpo")
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_dpo(vram, method: str) -> None:
    vram.step(method=method)


@pytest.mark.vram_budget(gb=0.25, model="tiny-qwen2-vl", batch=2, seq=96)
@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora"])
def test_vision_language(vram, method: str) -> None:
    vram.step(method=method)


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", method="lora", batch=2, seq=64, steps=4)
def test_no_growth_across_steps(vram) -> None:
    """Four steps: 2, 3 and 4 must peak the same (the marker's leak_tolerance is 0)."""
    r = vram.step()
    assert len(set(r.step_peak_bytes[1:])) == 1
