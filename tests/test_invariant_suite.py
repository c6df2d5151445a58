"""The shipped invariant suite catches a planted bug, naming the pair and the numbers.

The plant is an "8-bit" AdamW whose offload keeps the fp32 moments as well: the class of bug
in LLaMA-Factory users' 8-GPU measurements (a memory-saving option that costs more). It is registered over the real
``adamw-8bit`` by an importable module, so the worker child runs it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import output

SUITE = Path(__file__).parents[1] / "suites" / "test_invariants.py"

BROKEN = """
import torch

from pytest_vram.methods import OPTIMIZERS, register


class KeepsFp32Copy(type(OPTIMIZERS["adamw-8bit"])):
    def build(self, model, spec):
        optimizer = super().build(model, spec)
        real_step = optimizer.step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            for param, state in optimizer.state.items():
                # The bug: the fp32 moments the 8-bit state replaces are kept as well.
                for name in ("exp_avg_fp32", "exp_avg_sq_fp32"):
                    state.setdefault(name, torch.zeros_like(param, dtype=torch.float32))
            return out

        optimizer.step = step
        return optimizer


register(KeepsFp32Copy(), replace=True)
"""


@pytest.mark.parametrize("broken", [False, True], ids=["real", "planted"])
def test_invariant_suite_flags_a_planted_optimizer(pytester: pytest.Pytester, broken: bool) -> None:
    # Another basename: the suite module itself may already be imported in this process.
    pytester.makepyfile(test_shipped_invariants=SUITE.read_text("utf-8"))
    if broken:
        pytester.makepyfile(broken_optimizer=BROKEN)
        pytester.makeconftest("import broken_optimizer  # replaces adamw-8bit")
    # Baselines are recorded (not checked) so that only the invariants decide.
    result = pytester.runpytest("-p", "no:cacheprovider", "--vram-update", "-k", "8bit_and_galore")
    if not broken:
        result.assert_outcomes(passed=1)
        return
    result.assert_outcomes(failed=1)
    text = output(result)
    assert (
        "InvariantError: expected optimizer of [tiny-llama full adamw-8bit bf16 b2 s64] < " in text
    )
    assert "[tiny-llama full adamw bf16 b2 s64], but " in text
    result.stdout.re_match_lines(
        [
            r".*but \d+\.\d{3} MiB \([\d,]+ B\) vs \d+\.\d{3} MiB \([\d,]+ B\): \+\d+\.\d{3} MiB \(\+\d+\.\d%\)"
        ]
    )
