"""The core of ``pytest-vram estimate``: a spec traced on the fake meter, beside the published
rules of thumb (DeepSpeed's estimator, LLaMA-Factory's table). Plain values in, an ``Estimate``
out; the command and its text and JSON output are ``estimate_cli``.

MODEL is a zoo name or the path of a Hugging Face ``config.json``; the step is the real
``run_step`` under ``FakeMeter``, so every tensor the step holds is counted, without weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, final

from pytest_vram import errors, model_configs, references, zoo
from pytest_vram.device_profile import DeviceProfile
from pytest_vram.errors import SpecError
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec

__all__ = [
    "DeepSpeedFigure",
    "Estimate",
    "base_params",
    "config_shape",
    "deepspeed_figure",
    "estimate",
    "estimate_model",
    "zoo_entry",
]


def config_shape(path: Path) -> zoo.ModelShape:
    """A zoo shape from a Hugging Face ``config.json``: its model_type and all other fields."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"model {str(path)!r}: not a readable config.json: {exc}") from None
    data = model_configs.checked(str(path), data)
    model_type: str = data.pop("model_type")
    import transformers
    from transformers.models.auto import modeling_auto

    kind: Literal["causal-lm", "vision-language"]
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "causal-lm"
    elif model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        kind = "vision-language"
    else:
        raise SpecError(
            f"model {str(path)!r}: model_type {model_type!r} has no causal-LM or image-text "
            f"model in transformers {transformers.__version__}"
        )
    shape = zoo.ModelShape(model_type, data, notes=f"from {path}", kind=kind)
    zoo.checked_config(str(path), shape)  # the fields themselves, now rather than mid-trace
    return shape


@contextlib.contextmanager
def zoo_entry(model: str) -> Iterator[str]:
    """The zoo name to put in a spec for MODEL. A config.json is entered in ``zoo.MODELS`` under
    its path while the block runs: specs, methods and stages all look shapes up there."""
    if model in zoo.MODELS:
        yield model
        return
    _, path = model_configs.locate(model)  # a config.json, a folder holding one, a Hub id
    with zoo.registered(model, config_shape(path)):
        yield model


@final
@dataclasses.dataclass(frozen=True)
class DeepSpeedFigure:
    """One line of DeepSpeed's estimator table: per GPU and per CPU (node), in bytes."""

    function: str
    options: str
    gpu_bytes: int
    cpu_bytes: int
    total_params: int
    largest_layer_params: int | None  # ZeRO-3 only
    gpus_per_node: int
    nodes: int = 1


def deepspeed_figure(
    spec: StepSpec, total_params: int, largest_layer_params: int
) -> DeepSpeedFigure | str:
    """DeepSpeed's estimate for the spec's stage and offload, or why it has none.

    ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print a table of every offload
    option and return None; each line is computed by the function called here. Ranks are GPUs
    on one node; zero_init is 0, since pytest-vram builds the whole model on each rank.
    """
    if spec.zero not in (2, 3):
        what = "this step runs without DeepSpeed" if spec.zero is None else f"not {spec.zero}"
        return f"DeepSpeed's estimators cover ZeRO-2 and ZeRO-3; {what}"
    if not errors.installed("deepspeed"):
        return errors.missing_library("deepspeed", errors.extra("zero"))
    opt = spec.offload in ("optimizer", "both")
    par = spec.offload in ("param", "both")
    device = {True: "cpu", False: "none"}
    # deepspeed logs its accelerator choice to stdout on import: keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero import stage3, stage_1_and_2
    if spec.zero == 2:
        cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node=spec.ranks, num_nodes=1, cpu_offload=opt
        )
        return DeepSpeedFigure(
            "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs",
            f"offload_optimizer={device[opt]}",
            gpu,
            cpu,
            total_params,
            None,
            spec.ranks,
        )
    if par and not opt:
        return (
            "DeepSpeed's ZeRO-3 estimator has no line for offload_param without offload_optimizer"
        )
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=spec.ranks,
        num_nodes=1,
        cpu_offload=opt,
        cpu_offload_params=par,
        zero_init=False,
    )
    return DeepSpeedFigure(
        "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
        f"offload_param={device[par]}, offload_optimizer={device[opt]}, zero_init=0",
        gpu,
        cpu,
        total_params,
        largest_layer_params,
        spec.ranks,
    )


def base_params(name: str, attention: str = "sdpa") -> tuple[int, int]:
    """Parameters of the base model and of its largest module (DeepSpeed's "largest layer"),
    counted on the meta device: shapes only, in about a second for 32B. Built with the step's
    ``attention``: a model without sdpa (Gemma2) cannot be built with it at all."""
    import torch

    model = zoo.build_model(name, torch.bfloat16, "meta", attention)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@final
@dataclasses.dataclass(frozen=True)
class Estimate:
    """The traced step and, beside it, what the two published rules of thumb say."""

    spec: StepSpec
    result: MemoryResult  # the fake meter's step; with zero set, its per-rank ZeRO simulation
    base_params: int
    deepspeed: DeepSpeedFigure | str  # a figure, or why there is none
    llama_factory: references.TableValue | None
    capacity_bytes: int | None = None
    device: DeviceProfile | None = None  # the GPU the device lines predict for

    @property
    def device_bytes(self) -> tuple[int | None, int | None, int] | None:
        """(allocated, reserved, nvml) per rank on ``device``; allocated and reserved are
        None where the caching allocator is not simulated (ZeRO ranks), and nvml is then
        read from the storage peak."""
        if self.device is None:
            return None
        r, ranks = self.result, self.spec.ranks
        if r.allocated_bytes is not None and r.reserved_bytes is not None:
            return self.device.predict(r.allocated_bytes, r.reserved_bytes, ranks)
        return None, None, self.device.nvml_from_storage_bytes(r.peak_bytes, ranks)

    @property
    def simulated(self) -> bool:
        return self.spec.zero is not None

    @property
    def headroom_bytes(self) -> int | None:
        if self.capacity_bytes is None:
            return None
        return self.capacity_bytes - self.result.peak_bytes


def estimate(
    spec: StepSpec,
    capacity_bytes: int | None = None,
    notes: tuple[str, ...] = (),
    device: DeviceProfile | None = None,
) -> Estimate:
    """Trace ``spec`` on the fake meter (its model must be in ``zoo.MODELS``: see zoo_entry);
    ``notes`` go first in the result's notes; ``device`` adds what that GPU holds besides."""
    from pytest_vram.meters.fake import FakeMeter
    from pytest_vram.step import run_step

    reason = FakeMeter.unsupported(spec)
    if reason:
        raise errors.Unsupported(reason)
    # With zero set, run_step traces the step without DeepSpeed and lays it out per rank.
    result = run_step(spec, FakeMeter())
    if notes:
        result = dataclasses.replace(result, notes=(*notes, *result.notes))
    base, largest = base_params(spec.model, spec.attention)
    return Estimate(
        spec=spec,
        result=result,
        base_params=base,
        deepspeed=deepspeed_figure(spec, base, largest),
        llama_factory=references.llama_factory(spec.method, spec.optimizer, spec.precision, base),
        capacity_bytes=capacity_bytes,
        device=device,
    )


def estimate_model(
    model: str,
    capacity_bytes: int | None = None,
    device: DeviceProfile | None = None,
    **fields: Any,
) -> Estimate:
    """``estimate`` for MODEL (a zoo name or a config.json path) and the StepSpec ``fields``
    given; StepSpec's defaults and checks apply to the others."""
    with zoo_entry(model) as name:
        notes: tuple[str, ...] = ()
        if fields.get("attention") is None:
            # Not asked for: the one transformers itself falls back to, said in the notes,
            # rather than a refusal of a choice the user did not make.
            why = zoo.sdpa_missing(name)
            fields["attention"] = "eager" if why else "sdpa"
            notes = (f"attention eager, not the default sdpa: {why}",) if why else ()
        spec = StepSpec.from_kwargs(model=name, **fields)
        return estimate(spec, capacity_bytes, notes, device)
