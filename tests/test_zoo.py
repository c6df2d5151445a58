"""The zoo's real shapes match the published parameter counts (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from pytest_vram import zoo


@pytest.mark.parametrize("name", [n for n, s in zoo.MODELS.items() if s.published_params])
def test_parameter_count_matches_the_model_card(name: str) -> None:
    model = zoo.build_model(name, torch.bfloat16, device="meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == zoo.MODELS[name].published_params


def test_tiny_llama_is_small_and_real() -> None:
    model = zoo.build_model("tiny-llama", torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_importing_the_zoo_does_not_import_torch_eagerly() -> None:
    import subprocess
    import sys

    code = "import sys, pytest_vram.zoo, pytest_vram.spec, pytest_vram.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
