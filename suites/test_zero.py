"""DeepSpeed ZeRO stages 0-3, with and without optimizer offload, on two ranks.

The worst surprises users report are ZeRO ones: LLaMA-Factory users measured 188.8 GB instead
of 75.4 GB for a 32B LoRA 4-bit run under ZeRO-3 with CPU offload (``test_references.py``
reproduces the 188.8: every rank holds the gathered 4-bit weights until the backward, which
offload does not move). Each case runs the real engine on two gloo ranks; on the host
meter, offloaded state is tagged as host memory when DeepSpeed makes it, so "offload must not
raise device memory" is checked here as a GPU run would check it. Comparisons are per rank.

Budgets are 0.25 GiB though no host peak here reaches 80 MiB: they are sized for the GPU, whose
reserved peak adds the cuBLAS workspace, foreach AdamW's temporaries and the caching
allocator's segment rounding (README, "The shipped suite on a GPU").
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vram_budget(
    gb=0.25, model="tiny-llama", precision="bf16", batch=2, seq=64, zero=2, ranks=2
)

CASES = [
    (0, "none"),
    (1, "none"),
    (1, "optimizer"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
]


@pytest.mark.parametrize(("zero", "offload"), CASES, ids=[f"zero{z}-{o}" for z, o in CASES])
def test_zero_step(vram, zero: int, offload: str) -> None:
    r = vram.step(zero=zero, offload=offload)
    assert len(r.ranks) == 2 and r.peak_bytes == max(x.peak_bytes for x in r.ranks)
    assert r.zero_config is not None and r.zero_config["zero_optimization"]["stage"] == zero
    assert (r.host_offload_bytes > 0) == (offload != "none")


def test_model_states_shrink_stage_by_stage(vram) -> None:
    """Per rank: zero3 <= zero2 <= zero1 <= zero0 for parameters + gradients + optimizer state.
    With two ranks ZeRO-3 only ties ZeRO-2: it saves half the bf16 weights but holds its bf16
    gradient partition beside the fp32 copy the optimizer steps, which is the same size."""
    vram.assert_ordered(*(vram.step(zero=z) for z in (3, 2, 1, 0)), term="model_state")


def test_offload_does_not_raise_device_memory(vram) -> None:
    for zero in (1, 2, 3):
        offloaded = vram.step(zero=zero, offload="optimizer")
        vram.assert_lt(offloaded, vram.step(zero=zero))
        assert offloaded.breakdown.optimizer_bytes == 0  # all of it in host memory


def test_offload_of_the_llama_factory_8_gpu_configuration(vram) -> None:
    """LLaMA-Factory users' 8-GPU measurements (Juejin article, 2025): LoRA on ZeRO-3 with
    parameters and optimizer offloaded took 188.8 GB of GPU memory where the run without
    offload took 75.4 GB. Offloading must lower the device peak."""
    offloaded = vram.step(method="lora", zero=3, offload="both")
    vram.assert_lt(offloaded, vram.step(method="lora", zero=3))
    assert offloaded.host_offload_bytes > 0


def test_optimizer_state_is_partitioned_across_ranks(vram) -> None:
    """ZeRO-1 splits the fp32 master weights and both moments over the ranks: together the
    two ranks hold what ZeRO-0 holds on each, up to alignment padding and the 4-byte step
    counters (one per tensor under ZeRO-0, one per flat group under ZeRO-1)."""
    whole = vram.step(zero=0).ranks[0].breakdown.optimizer_bytes
    parts = sum(r.breakdown.optimizer_bytes for r in vram.step(zero=1).ranks)
    assert parts == pytest.approx(whole, abs=4 * 64)


def test_zero3_partitions_the_parameters(vram) -> None:
    zero2 = vram.step(zero=2)
    full = zero2.ranks[0].breakdown.param_bytes
    assert sum(r.breakdown.param_bytes for r in vram.step(zero=3).ranks) == full
    assert full == 2 * zero2.total_params  # bf16 weights


@pytest.mark.parametrize("method", ["freeze", "lora"])
def test_methods_under_zero2(vram, method: str) -> None:
    vram.assert_lt(vram.step(method=method, zero=2), vram.step(method="full", zero=2))
