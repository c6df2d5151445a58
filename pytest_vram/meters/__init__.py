"""Meters: how memory is read. ``base`` and ``unsupported`` are torch-free; the meters
themselves import torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from pytest_vram.meters.base import Meter

if TYPE_CHECKING:
    from pytest_vram.spec import StepSpec

__all__ = ["FAKE_UNSUPPORTED", "METERS", "make_meter", "unsupported"]

METERS = ("host", "cuda", "fake")

_NO_VALUES = "fake tensors hold no values"
_BNB_8BIT_OPTIMIZER = (
    "bitsandbytes' 8-bit optimizers build their quantization maps from tensor values at the "
    f"first step (functional.create_dynamic_map: torch.linspace(...).tolist()); {_NO_VALUES}"
)
# What the fake meter cannot trace: spec field -> value -> the library call that prevents it.
FAKE_UNSUPPORTED: Final[Mapping[str, Mapping[str, str]]] = {
    "kind": {
        "vision-language": "Qwen2-VL places its 3-D rotary positions by the values of the image "
        f"grid and the token ids (transformers.vision_utils.get_vision_position_ids); {_NO_VALUES}",
    },
    "method": {
        "lora-8bit": "bitsandbytes' Int8Params is a torch.Tensor subclass made with "
        "_make_subclass, which cannot wrap a fake tensor (the fake meter rebuilds QLoRA's "
        "4-bit layers around this, not LLM.int8()'s)",
    },
    "optimizer": {
        name: _BNB_8BIT_OPTIMIZER
        for name in ("adamw-8bit", "paged-adamw-8bit", "galore-adamw-8bit")
    },
}


def unsupported(meter: str, spec: StepSpec) -> str | None:
    """Why ``meter`` cannot measure ``spec`` (None if it can), decided without torch, so at
    collection. The methods' and optimizers' own ``unsupported`` still run in the child."""
    from pytest_vram import zoo

    if meter != "fake":
        return None
    kind = zoo.MODELS[spec.model].kind
    for field, value in (("kind", kind), ("method", spec.method), ("optimizer", spec.optimizer)):
        reason = FAKE_UNSUPPORTED[field].get(value)
        if reason:
            what = spec.model if field == "kind" else value
            return f"{what} is not supported on the fake meter: {reason}"
    return None


def make_meter(name: str, **options: Any) -> Meter:
    """``options`` configure the cuda meter (peak_source, snapshot_dir); others take none."""
    if options and name != "cuda":
        raise ValueError(f"the {name} meter takes no options; got {', '.join(sorted(options))}")
    if name == "host":
        from pytest_vram.meters.host import HostMeter

        return HostMeter()
    if name == "cuda":
        from pytest_vram.meters.cuda import CudaMeter

        return CudaMeter(**options)
    if name == "fake":
        from pytest_vram.meters.fake import FakeMeter

        return FakeMeter()
    raise ValueError(f"unknown meter {name!r}; known: {', '.join(METERS)}")
