"""torch's AdamW and SGD run the implementation the GPU would (foreach), whatever the device the
meter runs on, and the ZeRO simulation counts that implementation's step temporaries.

On the CPU torch would pick the for-loop; on CUDA, foreach (``_default_to_fused_or_foreach``),
whose AdamW step holds ``exp_avg_sq.sqrt()`` for the whole parameter group at once. The numbers
below are measured on the real torch optimizer, not restated.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pytest_vram import StepSpec
from pytest_vram.errors import SpecError
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter, StorageLedger
from pytest_vram.meters.watch import Watch
from pytest_vram.methods import OPTIMIZERS
from pytest_vram.methods.optim import IMPLEMENTATIONS
from pytest_vram.step import run_step

F32 = 4


def spec(optimizer: str = "adamw", method: str = "full", **options: Any) -> StepSpec:
    return StepSpec(
        "tiny-llama", method, optimizer, batch=1, seq=32, optimizer_options=tuple(options.items())
    )


def _step_temporaries(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes an optimizer step holds beyond parameters, gradients and state: its second step,
    with the state made by the first."""
    optimizer.step()
    ledger = StorageLedger()
    with Watch(ledger):
        for p in params:
            ledger.track(p)
            ledger.track(p.grad)  # type: ignore[arg-type]
        for state in optimizer.state.values():
            for t in state.values():
                ledger.track(t)
        held = ledger.live_bytes
        ledger.reset_peak()
        optimizer.step()
    return ledger.peak_bytes - held


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_adamw_builds_the_implementation_asked_for(implementation: str) -> None:
    built = OPTIMIZERS["adamw"].build(torch.nn.Linear(4, 4), spec(implementation=implementation))
    asked = IMPLEMENTATIONS[implementation]
    assert bool(built.defaults["foreach"]) == asked.get("foreach", False)
    assert bool(built.defaults["fused"]) == asked.get("fused", False)


def test_the_default_is_what_torch_picks_on_cuda() -> None:
    """Every meter, the GPU's included, runs foreach unless the spec asks otherwise: torch's
    own rule gives foreach on CUDA and the for-loop on the CPU the host meter runs on."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    assert "cuda" in _get_foreach_kernels_supported_devices()
    assert "cpu" not in _get_foreach_kernels_supported_devices()
    for name in ("adamw", "sgd"):
        built = OPTIMIZERS[name].build(torch.nn.Linear(4, 4), spec(name))
        assert built.defaults["foreach"] is True
        assert not built.defaults["fused"]


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_zero_step_temporaries_are_the_measured_ones(implementation: str) -> None:
    """ZeRO steps one flat fp32 partition: the simulation's temporaries per element are what
    the implementation holds stepping one fp32 tensor."""
    partition = torch.nn.Parameter(torch.zeros(4096))
    partition.grad = torch.ones_like(partition)
    built = OPTIMIZERS["adamw"].build(
        torch.nn.ParameterList([partition]), spec(implementation=implementation)
    )
    state = OPTIMIZERS["adamw"].zero_state_for(spec(implementation=implementation))
    assert state is not None
    measured = _step_temporaries(built, [partition])
    assert measured == state.step_temporaries_per_element * F32 * partition.numel()


def test_foreach_holds_the_whole_groups_sqrt_where_the_for_loop_holds_one_tensors() -> None:
    def temporaries(implementation: str) -> int:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (1000, 3000, 2000)]
        for p in params:
            p.grad = torch.ones_like(p)
        model = torch.nn.ParameterList(params)
        built = OPTIMIZERS["adamw"].build(model, spec(implementation=implementation))
        return _step_temporaries(built, params)

    assert temporaries("foreach") == F32 * (1000 + 3000 + 2000)
    # the largest tensor's sqrt and quotient, while the loop variable still holds the previous
    # tensor's quotient
    assert temporaries("for-loop") == F32 * (2 * 3000 + 1000)
    assert temporaries("fused") == 0


def test_an_unknown_implementation_is_refused_by_name() -> None:
    with pytest.raises(SpecError, match="implementation='fast' is not one of foreach, for-loop"):
        spec(implementation="fast")


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_fake_equals_host_for_each_implementation(implementation: str) -> None:
    case = spec(implementation=implementation)
    host, fake = run_step(case, HostMeter()), run_step(case, FakeMeter())
    assert fake.peak_bytes == host.peak_bytes
    assert fake.breakdown == host.breakdown


def test_foreach_step_peaks_above_the_for_loop_on_full_adamw() -> None:
    """Full AdamW training peaks in the optimizer step under foreach, by one more copy of the
    moments' size; the for-loop and fused steps do not add it."""
    peaks = {i: run_step(spec(implementation=i), FakeMeter()) for i in IMPLEMENTATIONS}
    state = peaks["foreach"].breakdown.optimizer_bytes // 2  # exp_avg_sq, in the params' dtype
    assert peaks["foreach"].peak_bytes >= peaks["for-loop"].peak_bytes + state // 2
    assert peaks["fused"].peak_bytes <= peaks["for-loop"].peak_bytes
