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

Activations come from a trace in which each gradient is dropped as it arrives (every rank runs
the whole model on its own micro-batch). A rank's peak is the largest of these moments, each with
what DeepSpeed holds then (``sim_terms`` derives each buffer from DeepSpeed's code):

* the forward and backward: the traced peak (at the loss), or the first gradient reduction
  just after it, with the reduction bucket (``reduce_bucket_size``, doubled by
  ``overlap_comm``), under optimizer offload the device staging buffer of the largest
  parameter and the fp64 norm of the rank's slice of the output projection's gradient; ZeRO-1
  also holds every gradient until its reductions after backward; ZeRO-3 holds its reduction
  bucket, its gradient partitions, the gradient arriving at the traced peak and the parameters
  gathered when the backward starts (``gather`` replays DeepSpeed's parameter coordinator).
* ZeRO-3's forward, before the output projection: the layers' activations with what the
  coordinator holds gathered then (a prefetch bucket that covers the model holds it twice).
* the optimizer step: the fp32 gradient partition and AdamW's temporaries on it, on the host
  under optimizer offload (with the pinned staging buffers DeepSpeed offloads through).

* ZeRO-3 with checkpointing: a layer's recompute inside backward, whose frozen weights stay
  gathered until the backward module under way releases them; the most the coordinator
  holds from the first recompute on, with the most activations the trace holds in backward
  after the loss (the two can be at different layers: a bound).

ZeRO-3 keeps parameters of at most ``stage3_param_persistence_threshold`` elements whole on
every rank beside their partitions (``gather.persistent``); their gradients and optimizer
state are partitioned like any other's.

``tests/test_zero_simulation.py`` checks the peaks and host bytes against the real engine.
ZeRO-3's gathering and persistence are replayed on the module tree of a llama-style decoder
built from the model's config; a model without one falls back to the output projection plus
the prefetch bucket at the loss, and its persistent parameters are not counted (said so in
the result's notes), nor is ZeRO-0's per-parameter step on CPU. The step is traced with its
parameters cast as the engine casts them (``engine.cast_as_engine``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from pytest_vram import methods
from pytest_vram.methods import ZeroState
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.zero import gather
from pytest_vram.zero import sim_terms as terms

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
    whatever the model. ZeRO-1/2 allocate theirs at the first gradient instead (``_ipg_bytes``)."""
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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One rank's simulated bytes: the breakdown at its peak, and what it holds on the host."""

    breakdown: Breakdown
    host: int


def _larger(*candidates: Breakdown) -> Breakdown:
    """The peak is the moment holding most: the forward and backward's, or the step's."""
    return max(candidates, key=lambda b: b.total_bytes)


def _rank(
    spec: StepSpec,
    state: ZeroState,
    traced: MemoryResult,
    rank: int,
    shape: terms.Shape,
    fetched: gather.Gathered | None,
) -> _Layout:
    """One rank's breakdown and the bytes it offloads to host memory. ``fetched``: what
    ZeRO-3's coordinator holds gathered, the same on every rank (None for another stage, or a
    model whose modules are not known)."""
    assert spec.zero is not None
    n, w = spec.ranks, _WEIGHT_BYTES[spec.precision]
    psi = traced.trainable_params
    mixed = w < _FP32
    moments = state.moment_bytes_per_param * psi
    weights = model_bytes(traced, w)
    buffers = traced.breakdown.buffer_bytes
    act = traced.breakdown.activation_bytes
    offload_opt = spec.zero > 0 and spec.offload in ("optimizer", "both")
    offload_param = spec.zero == 3 and spec.offload in ("param", "both")
    if spec.zero == 0:
        # FP16_UnfusedOptimizer (bf16 without ZeRO): every gradient in the model's dtype and
        # an fp32 copy, fp32 masters and moments, whole on every rank; the peak is the
        # backward's or the step's over the per-parameter fp32 masters.
        whole = Breakdown(
            param_bytes=weights,
            buffer_bytes=buffers,
            grad_bytes=w * psi + (_FP32 * psi if mixed else 0),
            optimizer_bytes=moments + (_FP32 * psi if mixed else 0),
            activation_bytes=0,
        )
        stepped = psi if state.whole_group else shape.largest_trainable
        temps = state.step_temporaries_per_element * _FP32 * stepped
        return _Layout(
            _larger(
                dataclasses.replace(whole, activation_bytes=act),
                dataclasses.replace(whole, activation_bytes=temps),
            ),
            0,
        )
    knobs = terms.ZeroKnobs.of(spec.zero, traced.zero_config)
    partition = psi // n
    # The fp32 master partition and the moments: the client optimizer's state.
    optimizer = (moments + _FP32 * psi) // n
    fp32_grads = _FP32 * partition  # made for the step (single_partition_of_fp32_groups.grad)
    host = 0
    if offload_opt:
        # The step runs on the host, its temporaries too; the fp32 gradient partition lives
        # there (initialize_optimizer_states / stage3 initialize_optimizer_states, pinned).
        host += optimizer + fp32_grads + _step_bytes(spec, state, psi)
        optimizer = 0
    # AdamW's temporaries on the fp32 partition, on the device when the step is.
    step_temps = 0 if offload_opt else _step_bytes(spec, state, psi)
    a1 = max(0, act - terms.loss_bytes(spec, shape))
    if spec.zero in (1, 2):
        ipg = _ipg_bytes(knobs, w)
        persist = 0
        # ZeRO-2 (and ZeRO-1 with overlap_comm) reduce inside backward, from the first
        # gradient on (process_gradients -> reduce_ready_partitions_and_remove_grads).
        reduces_in_backward = spec.zero == 2 or knobs.overlap_comm
        first = ipg if reduces_in_backward else 0
        if offload_opt:
            # DeepSpeedZeroOptimizer.__init__ (cpu_offload): temp_grad_buffer_for_gpu_offload,
            # the largest parameter's elements in the model's dtype, on the device from the
            # start; its twin temp_grad_buffer_for_cpu_offload and the bf16 partition the
            # updated weights come back through (param_buffer_of_bit16_for_cpu_offload_groups)
            # are pinned host memory.
            persist = w * shape.largest_trainable
            host += w * shape.largest_trainable + w * partition
            # The first reduction (reduce_ipg_grads -> copy_grads_in_partition) takes each
            # reduced gradient's norm in fp64 on the device, the output projection's first,
            # while the activations of every layer are still held.
            if reduces_in_backward:
                first += terms.norm_temporary(terms.first_reduction_slice(rank, n, psi, shape))
        backward = Breakdown(
            param_bytes=weights,
            buffer_bytes=buffers,
            optimizer_bytes=optimizer,
            activation_bytes=persist + max(act, a1 + first),
        )
        candidates = [backward]
        if spec.zero == 1 and not knobs.overlap_comm:
            # ZeRO-1 reduces nothing inside backward (process_gradients reduces only with
            # partition_gradients or overlap_comm): every gradient is held in the model's dtype
            # until reduce_gradients, which reduces them bucket by bucket, the first flat
            # parameter (the embedding, rank 0's) with its fp64 norm under offload. The host
            # meter sees these gradients as temporaries (no role holds them), and so do we.
            # process_gradients -> setup_buckets allocates the bucket at the first gradient
            # on every stage, so it is held beside them from then on.
            held = w * psi + persist + ipg
            if offload_opt:
                # The first flat parameter's gradient is copied into the bucket and freed
                # (reduce_independent_p_g_buckets_and_remove_grads) before its norm is taken.
                moved = (
                    shape.embedding_numel
                    if shape.embedding_numel <= knobs.reduce_bucket_size
                    else 0
                )
                norm = terms.norm_temporary(terms.first_flat_slice(rank, n, psi, shape))
                held = max(held, held - w * moved + norm)
            candidates.append(
                Breakdown(
                    param_bytes=weights,
                    buffer_bytes=buffers,
                    optimizer_bytes=optimizer,
                    activation_bytes=held,
                )
            )
            if not offload_opt:
                # At the step, the rank's own gradients are still held in the model's dtype
                # while get_flat_partition concatenates them (a second copy) and the fp32
                # partition gradient is made from that: the peak when the step's own
                # temporaries are smaller (foreach, fused).
                candidates.append(
                    Breakdown(
                        param_bytes=weights,
                        buffer_bytes=buffers,
                        grad_bytes=fp32_grads + w * partition,
                        optimizer_bytes=optimizer,
                        activation_bytes=w * partition,
                    )
                )
        step = Breakdown(
            param_bytes=weights,
            buffer_bytes=buffers,
            grad_bytes=0 if offload_opt else fp32_grads,
            optimizer_bytes=optimizer,
            activation_bytes=persist + step_temps,
        )
        return _Layout(_larger(*candidates, step), host)
    # ZeRO-3.
    # Persistent parameters are partitioned like the rest (their partitions on the device even
    # under parameter offload: Init._partition_param, ds_persist) and kept whole beside them.
    persist = fetched.persistent if fetched is not None else 0
    params = weights // n + persist
    if offload_param:
        host += (weights - persist) // n
        params = persist // n + persist
    # grad_partitions_flat_buffer (stage3 _setup_for_real_optimizer): the rank's gradient
    # partitions in the gradients' dtype, where the optimizer is (pinned host if offloaded).
    grad_flat = w * partition
    if offload_opt:
        host += grad_flat
        grad_flat = 0
    ipg = reduction_bucket_bytes(spec, traced.zero_config)
    # The gradient arriving at the traced peak (the trace drops each on arrival): autograd
    # makes it whole in the model's dtype before DeepSpeed's hook copies it into the bucket
    # (reduce_independent_p_g_buckets_and_remove_grads -> __add_grad_to_ipg_bucket).
    arriving = traced.breakdown.grad_bytes
    if fetched is None:
        backward_gathered, forward_gathered = _gathered_at_loss(knobs, shape, w, weights), 0
    else:
        backward_gathered, forward_gathered = fetched.backward_start, fetched.forward
    backward = Breakdown(
        param_bytes=params,
        buffer_bytes=buffers,
        grad_bytes=grad_flat,
        optimizer_bytes=optimizer,
        activation_bytes=ipg + act + arriving + backward_gathered,
    )
    # The forward before the output projection: the layers' activations without the loss's
    # (a1), with what the coordinator holds gathered then (a prefetch that covers the model
    # holds it twice, the flat buffer and each parameter's copy).
    forward = dataclasses.replace(backward, activation_bytes=ipg + a1 + forward_gathered)
    candidates = [backward, forward]
    if fetched is not None and fetched.recompute:
        # Checkpointed layers recomputed in backward: what the coordinator holds from the
        # first recompute on, with the layers' activations there.
        layers = terms.backward_layer_activations(traced, terms.loss_bytes(spec, shape))
        candidates.append(
            dataclasses.replace(backward, activation_bytes=ipg + layers + fetched.recompute)
        )
    step = Breakdown(
        # The step partitions every parameter first, persistent ones too
        # (DeepSpeedZeroOptimizer_Stage3.step -> _partition_all_parameters ->
        # release_and_reset_all), and gathers the persistent ones again after (_post_step).
        param_bytes=params - persist,
        buffer_bytes=buffers,
        grad_bytes=grad_flat + (0 if offload_opt else fp32_grads),
        optimizer_bytes=optimizer,
        activation_bytes=ipg + step_temps,
    )
    return _Layout(_larger(*candidates, step), host)


def _ipg_bytes(knobs: terms.ZeroKnobs, w: int) -> int:
    """ZeRO-1/2's reduction bucket: ``setup_buckets`` allocates ``reduce_bucket_size``
    elements of the gradients' dtype at the first gradient of a backward (two with
    ``overlap_comm``), kept until the step (``_release_ipg_buffers``)."""
    if not knobs.contiguous_gradients:
        return 0
    return knobs.reduce_bucket_size * w * (2 if knobs.overlap_comm else 1)


def _gathered_at_loss(knobs: terms.ZeroKnobs, shape: terms.Shape, w: int, weights: int) -> int:
    """ZeRO-3's gathered parameters at the loss, for a model whose module tree is not known
    (``gather.modules_of``): the output projection, used last in the
    forward and first in the backward, stays gathered (PartitionedParameterCoordinator
    releases only parameters not reused within ``stage3_max_reuse_distance``), and the
    backward's first modules are prefetched up to ``stage3_prefetch_bucket_size`` elements
    (``fetch_sub_module``), all within ``stage3_max_live_parameters``. Parameters under
    ``stage3_param_persistence_threshold`` are never gathered."""
    output = shape.output_numel if shape.output_numel > knobs.persistence_threshold else 0
    if not shape.vocab:
        return 0
    elements = min(output + knobs.prefetch_bucket_size, max(output, knobs.max_live_parameters))
    return min(w * elements, weights)


def _step_bytes(spec: StepSpec, state: ZeroState, psi: int) -> int:
    """Temporaries of the inner optimizer's step on this rank's fp32 partition, wherever the
    step runs (the device, or the host under optimizer offload): ZeRO-1/2 step the flat
    partition whole, ZeRO-3 per sub-group (``sub_group_size``)."""
    stepped = psi // spec.ranks
    if spec.zero == 3:
        stepped = min(stepped, _SUB_GROUP)
    return state.step_temporaries_per_element * _FP32 * stepped


def simulate(traced: MemoryResult, spec: StepSpec) -> MemoryResult:
    """Per-rank results for ``spec`` (zero set) from a trace of ``plain(spec)``."""
    if spec.zero is None:
        raise ValueError(f"simulate needs a ZeRO spec; {spec.label} has zero=None")
    state = methods.OPTIMIZERS[spec.optimizer].zero_state_for(spec)
    if state is None or spec.precision not in _WEIGHT_BYTES:
        raise ValueError(f"no simulated ZeRO layout for {spec.optimizer} {spec.precision}")
    shape = terms.shape_of(spec)
    # The coordinator's replay is the costly part of a rank, and every rank replays the same
    # module tree and prefetch budget: it runs once.
    fetched = None
    if spec.zero == 3:
        w = _WEIGHT_BYTES[spec.precision]
        fetched = gather.gathered_bytes(spec, w, traced.zero_config)
    layouts = [_rank(spec, state, traced, r, shape, fetched) for r in range(spec.ranks)]
    note = (
        f"simulated ZeRO-{spec.zero} layout over {spec.ranks} rank{'s' * (spec.ranks != 1)}: "
        "parameters, gradients and optimizer state as DeepSpeed partitions them; the traced "
        "forward and backward plus the reduction buckets, offload staging buffers and "
        "ZeRO-3's gathered and persistent parameters (its coordinator replayed), or the "
        "optimizer step on the rank's partition, whichever holds more"
    )
    if spec.zero == 3 and fetched is None:
        note += "; stage3_param_persistence_threshold not counted (the model's modules unknown)"
    ranks = tuple(
        dataclasses.replace(
            traced,
            label=spec.label,
            spec=spec,
            peak_bytes=layout.breakdown.total_bytes,
            step_peak_bytes=(layout.breakdown.total_bytes,),
            breakdown=layout.breakdown,
            host_offload_bytes=layout.host,
            notes=(*traced.notes, note),
            # The allocator's prediction replayed the unsharded trace, not this layout.
            allocated_bytes=None,
            reserved_bytes=None,
        )
        for layout in layouts
    )
    worst = max(ranks, key=lambda r: r.peak_bytes)
    return dataclasses.replace(
        worst, ranks=ranks, host_offload_bytes=sum(layout.host for layout in layouts)
    )
