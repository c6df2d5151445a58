"""The buffers DeepSpeed 0.19 allocates besides model state, each derived from its code.

``simulation`` adds these to the traced step. Every size is read from the config the engine
runs with (``MemoryResult.zero_config``: ``zero.config.ds_config`` or the user's JSON with
"auto" filled in), DeepSpeed's defaults (``deepspeed/runtime/zero/config.py``) where unset.
Sizes are in bytes, per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from pytest_vram import methods
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec

__all__ = [
    "Shape",
    "ZeroKnobs",
    "first_flat_slice",
    "first_reduction_slice",
    "backward_layer_activations",
    "loss_bytes",
    "norm_temporary",
    "shape_of",
]

_FP32: Final = 4
# Gradient norms are taken in fp64 where the device has it (CUDA and CPU):
# deepspeed/runtime/zero/utils.py get_norm_dtype.
_NORM_ITEMSIZE: Final = 8
# DeepSpeedZeroConfig defaults (deepspeed/runtime/zero/config.py).
_DEFAULT_BUCKET: Final = 500_000_000
_DEFAULT_PREFETCH: Final = 50_000_000
_DEFAULT_MAX_LIVE: Final = 1_000_000_000
_DEFAULT_PERSISTENCE: Final = 100_000
_DEFAULT_REUSE: Final = 1_000_000_000
_UNBOUNDED: Final = 2**63 - 1  # DeepSpeed's default model_persistence_threshold (sys.maxsize)


def _number(value: Any, default: int) -> int:
    """A config number; "auto" left in (a config read without a model) is the default."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


@dataclasses.dataclass(frozen=True)
class ZeroKnobs:
    """The ``zero_optimization`` settings the simulated terms depend on."""

    reduce_bucket_size: int = _DEFAULT_BUCKET
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    prefetch_bucket_size: int = _DEFAULT_PREFETCH
    max_live_parameters: int = _DEFAULT_MAX_LIVE
    persistence_threshold: int = _DEFAULT_PERSISTENCE
    max_reuse_distance: int = _DEFAULT_REUSE
    model_persistence_threshold: int = _UNBOUNDED

    @classmethod
    def of(cls, stage: int, config: Mapping[str, Any] | None) -> ZeroKnobs:
        zero: Mapping[str, Any] = (config or {}).get("zero_optimization", {})
        offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        # DeepSpeedZeroConfig.overlap_comm_valid: unset means on for ZeRO-3 only.
        overlap = zero.get("overlap_comm")
        return cls(
            reduce_bucket_size=_number(zero.get("reduce_bucket_size"), _DEFAULT_BUCKET),
            # DeepSpeedZeroOptimizer.__init__: contiguous_gradients or cpu_offload.
            contiguous_gradients=bool(zero.get("contiguous_gradients", True))
            or (stage in (1, 2) and offloaded),
            overlap_comm=stage == 3 if overlap is None else bool(overlap),
            prefetch_bucket_size=_number(
                zero.get("stage3_prefetch_bucket_size"), _DEFAULT_PREFETCH
            ),
            max_live_parameters=_number(zero.get("stage3_max_live_parameters"), _DEFAULT_MAX_LIVE),
            persistence_threshold=_number(
                zero.get("stage3_param_persistence_threshold"), _DEFAULT_PERSISTENCE
            ),
            max_reuse_distance=_number(zero.get("stage3_max_reuse_distance"), _DEFAULT_REUSE),
            model_persistence_threshold=_number(
                zero.get("stage3_model_persistence_threshold"), _UNBOUNDED
            ),
        )


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the terms need of the model: the output projection and the largest trainable
    parameter (elements), and the vocabulary, from the model's config."""

    vocab: int = 0
    output_numel: int = 0  # lm_head, partitioned and gathered like any weight; 0 when tied
    largest_trainable: int = 0
    first_reduced: int = 0  # the first trainable parameter whose gradient arrives in backward
    embedding_numel: int = 0  # the input embedding, when trained: the first flat parameter


def shape_of(spec: StepSpec) -> Shape:
    """The model's shape from its transformers config (zoo models and registered configs);
    an unknown model gives zeros, and the terms that need a shape are left out."""
    from pytest_vram import zoo

    try:
        config = zoo.build_config(spec.model)
    except Exception:  # noqa: BLE001  # not a zoo model: no shape-derived terms
        return Shape()
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = vocab * hidden
    output = 0 if tied else embedding
    mlp = hidden * inter
    trains = methods.METHODS[spec.method].trains
    if trains is methods.Trains.ALL_WEIGHTS:
        # Backward reaches the untied output projection first; a tied one accumulates its
        # gradient until the embedding's, last: the last layer's MLP comes first then.
        return Shape(vocab, output, max(embedding, mlp), output or mlp, embedding)
    if trains is methods.Trains.LORA:
        rank = int(spec.method_option("rank"))
        adapter = rank * max(hidden, inter)
        return Shape(vocab, output, adapter, adapter)
    return Shape(vocab, output)


def loss_bytes(spec: StepSpec, shape: Shape) -> int:
    """What the traced peak holds at the loss that is freed before the first parameter
    gradient arrives: transformers' ``ForCausalLMLoss`` upcasts the logits to fp32; the fp32
    logits, their log-softmax and its gradient (b x s x vocab each) go once the logits'
    gradient is back in the model's dtype, before the output projection's gradient."""
    return 3 * spec.batch * spec.seq * shape.vocab * _FP32


def first_reduction_slice(rank: int, ranks: int, psi: int, shape: Shape) -> int:
    """Elements of the first-reduced parameter in ``rank``'s partition. ZeRO-1/2 flatten the
    trainable parameters in order and give rank r the r-th of N equal slices
    (``DeepSpeedZeroOptimizer.get_data_parallel_partitions``); the output projection is the
    last parameter, so it lies in the last rank's slice (padding for alignment ignored)."""
    if not shape.first_reduced or not psi:
        return 0
    size = -(-psi // ranks)
    lo, hi = rank * size, min((rank + 1) * size, psi)
    first_lo = psi - min(shape.first_reduced, psi)
    return max(0, hi - max(lo, first_lo))


def first_flat_slice(rank: int, ranks: int, psi: int, shape: Shape) -> int:
    """Elements of the first flat parameter in ``rank``'s partition: a trainable input
    embedding (the largest trainable parameter of a full fine-tune) opens the flat buffer."""
    if not shape.embedding_numel or not psi:
        return 0
    size = -(-psi // ranks)
    lo, hi = rank * size, min((rank + 1) * size, psi)
    return max(0, min(hi, shape.embedding_numel) - lo)


def norm_temporary(elements: int) -> int:
    """``set_norm_for_param_grad_in_gpu`` (and ``copy_grads_in_partition``'s compact path):
    ``accumulated_grad.data.to(get_norm_dtype()).norm(2)`` makes an fp64 copy of the rank's
    slice of each reduced gradient, under offload, on the device."""
    return _NORM_ITEMSIZE * elements


def backward_layer_activations(traced: MemoryResult, loss: int) -> int:
    """The most activations the trace holds in backward once the loss's fp32 tensors
    (``loss``, ``loss_bytes``) are freed: with checkpointing, a layer's recomputed forward and
    its backward over the layers' saved inputs. Read from the trace's timeline (a decimated
    one keeps each bucket's highest point), less the weights and buffers it holds throughout
    (its gradients are dropped on arrival); 0 without a timeline."""
    timeline = traced.timeline
    if timeline is None or not loss:
        return 0
    fixed = traced.breakdown.param_bytes + traced.breakdown.buffer_bytes
    phases = timeline.phases
    most = 0
    for i, phase in enumerate(phases):
        if phase.name != "backward":
            continue
        end = phases[i + 1].start if i + 1 < len(phases) else None
        highest, after = 0, False
        for x, live in zip(timeline.x, timeline.live_bytes, strict=True):
            if x < phase.start or (end is not None and x >= end):
                continue
            if after:
                most = max(most, live - fixed)
            else:
                highest = max(highest, live)
                after = live <= highest - loss
    return most
