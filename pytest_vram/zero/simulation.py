"""ZeRO on the fake meter: DeepSpeed's per-rank layout applied to a traced step's sizes.

The DeepSpeed engine does not run under FakeTensorMode, so a real-size ZeRO case traces the
step without DeepSpeed and lays its model state out per rank as DeepSpeed 0.16-0.19 does. With
Φ parameters, Ψ of them trainable, w bytes per weight (2 for bf16/fp16, 4 for fp32) and N
ranks, the bytes each rank holds at the peak of a step, as measured on the real engine
(``suites/test_zero.py`` and ``tests/test_zero_simulation.py`` check these on tiny models):

=========  ==============  =====================================  ==============================
stage      parameters      gradients                              optimizer (AdamW)
=========  ==============  =====================================  ==============================
0          wΦ              wΨ (+ 4Ψ fp32 accumulators if w < 4)   8Ψ (+ 4Ψ fp32 master if w < 4)
1, 2       wΦ              4Ψ/N (the fp32 gradient partition)     12Ψ/N (master + two moments)
3          wΦ/N            wΨ/N + 4Ψ/N (partition + fp32 copy)    12Ψ/N
=========  ==============  =====================================  ==============================

Parameters are counted as the engine holds them (``model_bytes``): DeepSpeed casts floating
parameters to the run's precision and keeps bitsandbytes' packed 4-bit weights as they are.
Offloading the optimizer moves its state and the fp32 gradient partition to host memory;
offloading parameters (ZeRO-3) moves their partitions too.

Activations come from a trace in which each gradient is dropped as it arrives, so its peak is
the forward and backward's (every rank runs the whole model on its own micro-batch), not an
unsharded optimizer step's. The step's own peak is the model state plus AdamW's two
temporaries on the rank's fp32 partition (ZeRO-3: per sub-group); a rank's peak is the larger
of the two. ``tests/test_zero_simulation.py`` compares the peaks with the real engine's.

Not simulated, and said so in the result's notes:

* ZeRO-3's gathered layers (``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``)
  and ZeRO-1/2's reduction buckets. On the real engine an LLM's peak is at the loss, where no
  layer is gathered. ZeRO-3's reduction bucket is counted (``reduction_bucket_bytes``), sized
  by the config the engine would run with (the user's ``deepspeed=`` JSON, "auto" filled in).
* ``stage3_param_persistence_threshold``: parameters under it stay whole on every rank; the
  simulation partitions them all.
* The device-side staging of what offload moves to the host: with offload the simulated peak
  is under the engine's (by 15% and 26% on tiny-llama's offloaded cases).
* DeepSpeed's cast of peft's fp32 upcasts back to bf16: the trace is of the model as the method
  builds it, and its activations err high (QLoRA under ZeRO-2: 37% above the engine on
  tiny-llama).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from pytest_vram import methods
from pytest_vram.methods import ZeroState
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec

__all__ = ["plain", "reduction_bucket_bytes", "simulate"]

_WEIGHT_BYTES: Final = {"fp32": 4, "bf16": 2, "fp16": 2}
_FP32: Final = 4
_FLOAT_ITEMSIZE: Final = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed's default reduce_bucket_size (deepspeed/runtime/zero/config.py).
_DEFAULT_BUCKET: Final = 500_000_000
# DeepSpeed's default stage3 sub_group_size: ZeRO-3 steps its fp32 partition in groups of this
# many elements; ZeRO-1/2 step it whole.
_SUB_GROUP: Final = 10**9


def plain(spec: StepSpec) -> StepSpec:
    """The spec without DeepSpeed: what the fake meter traces before the layout is applied."""
    return dataclasses.replace(spec, zero=None, offload="none", ranks=1, deepspeed="")


def reduction_bucket_bytes(spec: StepSpec, config: Mapping[str, Any] | None) -> int:
    """ZeRO-3's gradient reduction bucket, on the device from the engine's start: with
    ``contiguous_gradients`` (the default) ``DeepSpeedZeroOptimizer_Stage3.__init__`` allocates
    ``reduce_bucket_size`` elements of the gradients' dtype (deepspeed/runtime/zero/stage3.py,
    "IPG"). Left out, the size is DeepSpeed's default, 5e8 elements: 1 GB in bf16 per rank,
    whatever the model. ZeRO-1/2 fill their buckets inside backward and did not move the peak
    of the real engine (tiny-llama, 2**19 against 2**22 elements), so they are not counted."""
    if spec.zero != 3:
        return 0
    zero: Mapping[str, Any] = (config or {}).get("zero_optimization", {})
    if not zero.get("contiguous_gradients", True):
        return 0
    size = zero.get("reduce_bucket_size", _DEFAULT_BUCKET)
    return int(float(size)) * _WEIGHT_BYTES[spec.precision]


def model_bytes(traced: MemoryResult, w: int) -> int:
    """The parameters as the engine holds them: DeepSpeed casts every floating parameter to
    the run's precision (peft's fp32 adapters and k-bit upcasts too); bitsandbytes' packed
    4-bit weights are integer storage and keep their bytes."""
    if not traced.param_dtype_bytes:
        return w * traced.total_params
    total = 0
    for dtype, nbytes in traced.param_dtype_bytes.items():
        itemsize = _FLOAT_ITEMSIZE.get(dtype)
        total += nbytes // itemsize * w if itemsize else nbytes
    return total


def _rank(spec: StepSpec, state: ZeroState, traced: MemoryResult) -> tuple[Breakdown, int]:
    """One rank's breakdown and the bytes it offloads to host memory."""
    assert spec.zero is not None
    n, w = spec.ranks, _WEIGHT_BYTES[spec.precision]
    psi = traced.trainable_params
    mixed = w < _FP32
    moments = state.moment_bytes_per_param * psi
    weights = model_bytes(traced, w)
    if spec.zero == 0:
        params = weights
        grads = w * psi + (_FP32 * psi if mixed else 0)
        optimizer = moments + (_FP32 * psi if mixed else 0)
    else:
        params = weights // n if spec.zero == 3 else weights
        fp32_grads = _FP32 * psi // n
        grads = fp32_grads + (w * psi // n if spec.zero == 3 else 0)
        optimizer = (moments + _FP32 * psi) // n
    host = 0
    if spec.offload in ("optimizer", "both"):
        host += optimizer + _FP32 * psi // n
        grads, optimizer = 0, 0
    if spec.offload in ("param", "both"):
        host += params
        params = 0
    breakdown = Breakdown(
        param_bytes=params,
        buffer_bytes=traced.breakdown.buffer_bytes,
        grad_bytes=grads,
        optimizer_bytes=optimizer,
        # The peak is the forward and backward's or the step's, whichever holds more; ZeRO-3's
        # reduction bucket is there for both.
        activation_bytes=max(traced.breakdown.activation_bytes, _step_bytes(spec, state, psi))
        + reduction_bucket_bytes(spec, traced.zero_config),
    )
    return breakdown, host


def _step_bytes(spec: StepSpec, state: ZeroState, psi: int) -> int:
    """Temporaries of the inner optimizer's step on this rank's fp32 partition (on the device
    unless the optimizer is offloaded; ZeRO-0 is not partitioned and measured below this)."""
    if spec.zero == 0 or spec.offload in ("optimizer", "both"):
        return 0
    stepped = psi // spec.ranks
    if spec.zero == 3:
        stepped = min(stepped, _SUB_GROUP)
    return state.step_temporaries_per_element * _FP32 * stepped


def simulate(traced: MemoryResult, spec: StepSpec) -> MemoryResult:
    """Per-rank results for ``spec`` (zero set) from a trace of ``plain(spec)``."""
    if spec.zero is None:
        raise ValueError(f"simulate needs a ZeRO spec; {spec.label} has zero=None")
    state = methods.OPTIMIZERS[spec.optimizer].zero_state
    if state is None or spec.precision not in _WEIGHT_BYTES:
        raise ValueError(f"no simulated ZeRO layout for {spec.optimizer} {spec.precision}")
    breakdown, host = _rank(spec, state, traced)
    note = (
        f"simulated ZeRO-{spec.zero} layout over {spec.ranks} rank{'s' * (spec.ranks != 1)}: "
        "parameters, gradients and "
        "optimizer state as DeepSpeed partitions them; activations traced (forward and "
        "backward, unsharded) or the optimizer step's temporaries on the rank's partition, "
        "whichever is larger, plus ZeRO-3's reduction bucket; gathered layers, ZeRO-1/2 "
        "buckets and stage3_param_persistence_threshold not counted"
    )
    rank = dataclasses.replace(
        traced,
        label=spec.label,
        spec=spec,
        peak_bytes=breakdown.total_bytes,
        step_peak_bytes=(breakdown.total_bytes,),
        breakdown=breakdown,
        host_offload_bytes=host,
        notes=(*traced.notes, note),
        # The allocator's prediction replayed the unsharded trace, not this layout.
        allocated_bytes=None,
        reserved_bytes=None,
    )
    return dataclasses.replace(
        rank, ranks=tuple(rank for _ in range(spec.ranks)), host_offload_bytes=host * spec.ranks
    )
