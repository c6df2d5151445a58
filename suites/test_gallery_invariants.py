"""Invariants that catch, without a baseline, regressions the rest of the suite only sees as drift.

Each one is the ordering a public report found broken (``suites/regressions/`` plants each bug;
``benchmarks/regression_gallery.py`` prints what catches what):

* offload that keeps a device copy of what it moves (DeepSpeed#467 "Zero-Offload Doubles VRAM
  Usage"): on tiny-llama the copy still leaves the offloaded peak under the one without offload,
  so "offload must not raise device memory" holds; "offload frees at least the optimizer state it
  moves" does not;
* ZeRO-3 holding as much as ZeRO-2 under LoRA (LlamaFactory#493, DeepSpeed#4305): a full
  fine-tuning step peaks at its optimizer step, where ZeRO-3 has re-partitioned every layer, so
  only a LoRA step (which peaks at its activations) shows parameters left whole;
* a bf16 LoRA run that upcasts frozen weights to fp32 (peft#1149): on tiny-llama's 2,048-word
  head it moves the peak 4.9%, inside the baselines' 5% tolerance; the dtypes of the weights
  show it exactly;
* memory that grows from step to step (transformers#26284): the marker's leak check names the
  steps, where a test's own ``assert`` on the step peaks would be the failure's first line.

Budgets are 0.25 GiB, sized for the GPU as in ``test_zero.py``; most cases are the same specs
as ``test_zero.py``'s and ``test_methods.py``'s, measured once per session.
"""

from __future__ import annotations

import pytest

from pytest_vram import MemoryResult

pytestmark = pytest.mark.vram_budget(gb=0.25, model="tiny-llama", precision="bf16", batch=2, seq=64)
RANKS = 2


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB ({nbytes:,d} B)"


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_offload_frees_the_optimizer_state_it_moves(vram, zero: int) -> None:
    """Per rank: the device peak with the optimizer offloaded is at most the peak without
    offload less the optimizer state that run held on the device (fp32 master and moments)."""
    plain = vram.step(zero=zero, ranks=RANKS)
    offloaded = vram.step(zero=zero, ranks=RANKS, offload="optimizer")
    assert offloaded.host_offload_bytes > 0
    for rank, (p, o) in enumerate(zip(plain.ranks, offloaded.ranks, strict=True)):
        freed = p.peak_bytes - p.breakdown.optimizer_bytes
        assert o.peak_bytes <= freed, (
            f"[{o.label}] on rank {rank} peaks at {mib(o.peak_bytes)}, above what "
            f"[{p.label}] holds besides its optimizer state, {mib(freed)}: "
            f"{(o.peak_bytes - freed) / 2**20:+.3f} MiB of what offload moved stays on the device"
        )


def test_zero3_holds_less_than_zero2_under_lora(vram) -> None:
    """LlamaFactory#493: LoRA took the same memory per GPU under ZeRO-2 and ZeRO-3. ZeRO-3
    partitions the frozen base weights, which are most of a LoRA step's model state: per rank
    it must hold less, and peak no higher."""
    zero3 = vram.step(method="lora", zero=3, ranks=RANKS)
    zero2 = vram.step(method="lora", zero=2, ranks=RANKS)
    vram.assert_lt(zero3, zero2, term="model_state")
    vram.assert_le(zero3, zero2)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_adapters_keep_fp32_only_in_the_adapters(vram, method: str) -> None:
    """peft keeps the adapters (and DoRA's magnitudes) in fp32 and the frozen base in the run's
    bf16: the fp32 weights are exactly the trainable ones."""
    r: MemoryResult = vram.step(method=method)
    assert r.param_dtype_bytes.get("float32", 0) == 4 * r.trainable_params, (
        f"[{r.label}] holds {mib(r.param_dtype_bytes.get('float32', 0))} of fp32 weights, "
        f"{r.trainable_params:,d} trainable parameters are {mib(4 * r.trainable_params)}: "
        f"frozen weights were upcast (weights by dtype: {r.param_dtype_bytes})"
    )


@pytest.mark.vram_budget(gb=0.25, model="tiny-llama", method="lora", batch=2, seq=64, steps=4)
def test_steady_steps_peak_the_same(vram) -> None:
    """transformers#26284: memory that grows every step until the run is out of memory. No
    assertion here: the marker's leak check (``leak_tolerance`` 0) fails the case, naming the
    two steps and what the peak holds. (``test_methods.py``'s twin asserts the same itself, and
    its own ``assert`` is then the failure's first line.)"""
    vram.step()
