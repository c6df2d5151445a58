"""bitsandbytes' torch.compile calls are made at their first call, not at its import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from pytest_vram.deferred_compile import deferred


def _recording_backend(compiled: list[str]) -> Any:
    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        compiled.append(gm.code)
        return gm.forward

    return backend


@pytest.mark.parametrize("form", ["call", "decorator"])
def test_a_function_is_compiled_at_its_first_call_with_its_options(form: str) -> None:
    compiled: list[str] = []

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1

    compile_later = deferred(torch.compile)
    backend = _recording_backend(compiled)
    if form == "call":
        fn = compile_later(scale, backend=backend, dynamic=False)
    else:
        fn = compile_later(backend=backend, dynamic=False)(scale)
    assert compiled == []  # nothing compiled yet
    assert fn.__name__ == "scale"
    x = torch.arange(4.0)
    assert torch.equal(fn(x), x * 3 + 1)
    assert len(compiled) == 1 and "mul" in compiled[0]  # compiled, by the backend it was given
    assert torch.equal(fn(x + 1), (x + 1) * 3 + 1)
    assert len(compiled) == 1  # once


def test_a_module_is_compiled_at_once() -> None:
    compiled: list[str] = []
    module = deferred(torch.compile)(torch.nn.Linear(2, 2), backend=_recording_backend(compiled))
    assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def test_bitsandbytes_imports_without_torchs_inductor_and_still_quantizes() -> None:
    pytest.importorskip("bitsandbytes")
    # A new interpreter: this one may have imported bitsandbytes or the inductor already.
    code = textwrap.dedent(
        """
        import sys
        import pytest_vram.deferred_compile
        import torch
        compile_now = torch.compile
        import bitsandbytes
        from bitsandbytes import functional
        assert "torch._inductor.compile_fx" not in sys.modules, "inductor imported"
        assert torch.compile is compile_now, "torch.compile not given back"
        x = torch.randn(64, 64)
        packed, state = functional.quantize_4bit(x, quant_type="nf4")
        back = functional.dequantize_4bit(packed, state)
        error = (back - x).abs().mean() / x.abs().mean()
        assert back.shape == x.shape and error < 0.15, error
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_without_it_bitsandbytes_imports_the_inductor() -> None:
    """The reason for the module: if bitsandbytes stops compiling at import, it can go."""
    pytest.importorskip("bitsandbytes")
    code = "import sys, bitsandbytes; print('torch._inductor.compile_fx' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"
