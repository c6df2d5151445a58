"""The DeepSpeed config a spec runs with. Torch-free: the pytest process can read it too."""

from __future__ import annotations

from typing import Any, Final

from pytest_vram.spec import StepSpec

__all__ = ["ds_config"]

_FOREVER: Final = 10**9


def ds_config(spec: StepSpec, largest_param_numel: int) -> dict[str, Any]:
    """The DeepSpeed config for ``spec`` given as zero= and offload=. Buckets are sized to the
    model: DeepSpeed's defaults (5e8 elements) pre-allocate buffers that would dwarf a small
    model and say nothing about it. A user's own config (``deepspeed=``) is
    ``user_config.resolve``'s."""
    assert spec.zero is not None
    bucket = max(largest_param_numel, 2**16)
    zero: dict[str, Any] = {
        "stage": spec.zero,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if spec.zero == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            stage3_max_live_parameters=2 * bucket,
            stage3_max_reuse_distance=2 * bucket,
            # The default (1e5 elements) keeps every parameter of a tiny model unpartitioned.
            stage3_param_persistence_threshold=0,
        )
    if spec.offload in ("optimizer", "both"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload in ("param", "both"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # Keep the client torch optimizer under offload (else DeepSpeedCPUAdam replaces it).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _FOREVER,
        "wall_clock_breakdown": False,
    }
    if spec.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif spec.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return config
