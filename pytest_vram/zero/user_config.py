"""A DeepSpeed config as the user wrote it (``deepspeed=`` a JSON path or a dict).

The pytest process reads what decides the case (ZeRO stage, what is offloaded) without torch;
the rank resolves the ``"auto"`` values with transformers' own ``HfTrainerDeepSpeedConfig``,
as ``Trainer`` does, from the step (batch, ranks, precision, the optimizer's lr and weight
decay) and the model (hidden size). Every other setting runs as written.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pytest_vram.errors import SpecError

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec

__all__ = ["canonical", "load", "resolve", "stage_and_offload"]

_DEVICES: Final = ("none", "cpu", "nvme")
# transformers.TrainingArguments' defaults for what a step does not choose.
_MAX_GRAD_NORM: Final = 1.0
_ADAM_BETAS: Final = (0.9, 0.999)
_ADAM_EPSILON: Final = 1e-8


def canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def load(value: object) -> dict[str, Any]:
    """The config ``value`` names: a dict, its JSON text (a spec's frozen form), or a path."""
    if isinstance(value, Mapping):
        data: object = dict(value)
    elif isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise SpecError(f"deepspeed=: not JSON: {exc}") from None
    elif isinstance(value, (str, Path)):
        try:
            data = json.loads(Path(value).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SpecError(
                f"deepspeed={str(value)!r}: not a readable DeepSpeed JSON: {exc}"
            ) from None
    else:
        raise SpecError(f"deepspeed={value!r} must be a path to a DeepSpeed JSON config or a dict")
    if not isinstance(data, dict):
        raise SpecError(f"deepspeed={value!r}: a DeepSpeed config is a JSON object")
    try:
        canonical(data)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"deepspeed={value!r}: not JSON-serialisable: {exc}") from None
    return data


def _device(zero: Mapping[str, Any], part: str) -> str:
    section = zero.get(part, {})
    if section is None:
        return "none"
    if not isinstance(section, Mapping):
        raise SpecError(f"deepspeed: zero_optimization.{part}={section!r} must be an object")
    device = section.get("device", "none")
    if device not in _DEVICES:
        raise SpecError(
            f"deepspeed: zero_optimization.{part}.device={device!r} must be one of "
            f"{', '.join(_DEVICES)}"
        )
    if device == "nvme":
        raise SpecError(
            f"deepspeed: zero_optimization.{part}.device='nvme' is not run by pytest-vram: it "
            "needs DeepSpeed's async I/O op and an nvme_path on this machine; measure with 'cpu'"
        )
    return str(device)


# The keys transformers' HfTrainerDeepSpeedConfig fills when "auto" and otherwise compares with
# the step, by what each must hold (the optimizer's are refused with its section).
_FLAG: Final = 'true, false or "auto"'
# DeepSpeed keeps counts and sizes as int64
_COUNT: Final = 'an integer >= 1 (below 2**63) or "auto"'
_NUMBER: Final = 'a number >= 0 (below 2**63) or "auto"'
_FILLED: Final = {
    "train_micro_batch_size_per_gpu": _COUNT,
    "gradient_accumulation_steps": _COUNT,
    "train_batch_size": _COUNT,
    "gradient_clipping": _NUMBER,
    "fp16.enabled": _FLAG,
    "bf16.enabled": _FLAG,
    "scheduler.params.warmup_min_lr": _NUMBER,
    "scheduler.params.warmup_max_lr": _NUMBER,
    "scheduler.params.warmup_num_steps": _NUMBER,
    "scheduler.params.total_num_steps": _NUMBER,
    "zero_optimization.reduce_bucket_size": _NUMBER,
    "zero_optimization.stage3_prefetch_bucket_size": _NUMBER,
    "zero_optimization.stage3_param_persistence_threshold": _NUMBER,
}


def _holds(value: object, kind: str) -> bool:
    if value == "auto" or value is None:  # null: not given, for transformers and DeepSpeed
        return True
    if kind == _FLAG:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == _COUNT:
        return isinstance(value, int) and 1 <= value < 2**63
    return 0 <= value < 2**63  # false for nan


def _check_filled(config: Mapping[str, Any]) -> None:
    """The values transformers fills or compares, by type, in the pytest process: in the rank a
    wrong one (``bf16.enabled: "maybe"``) is only a mismatch with the step, after the model is
    built."""
    for key, kind in _FILLED.items():
        node: Any = config
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            node = node.get(part)
            if node is None:
                break
            if not isinstance(node, Mapping):
                where = ".".join(parents[: depth + 1])
                example = '{"enabled": "auto"}' if last == "enabled" else "{...}"
                raise SpecError(f"deepspeed: {where}={node!r} must be an object, e.g. {example}")
        else:
            if not _holds(node.get(last), kind):
                raise SpecError(f"deepspeed: {key}={node.get(last)!r} must be {kind}")


def stage_and_offload(config: Mapping[str, Any]) -> tuple[int, str]:
    """The ZeRO stage and the spec's ``offload`` word that the config amounts to."""
    _check_filled(config)
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise SpecError(f"deepspeed: zero_optimization={zero!r} must be an object")
    stage = zero.get("stage", 0)  # DeepSpeed's default
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise SpecError(f"deepspeed: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    if "optimizer" in config:
        raise SpecError(
            "deepspeed: an 'optimizer' section makes DeepSpeed build its own optimizer (FusedAdam, "
            "or DeepSpeedCPUAdam under offload), which pytest-vram does not run yet; remove it "
            "and choose the step's optimizer="
        )
    optimizer = _device(zero, "offload_optimizer") == "cpu"
    param = _device(zero, "offload_param") == "cpu"
    offload = {(True, True): "both", (True, False): "optimizer", (False, True): "param"}
    return int(stage), offload.get((optimizer, param), "none")


def resolve(spec: StepSpec, model: torch.nn.Module) -> dict[str, Any]:
    """The config DeepSpeed runs: the user's, with "auto" filled in as transformers' Trainer
    fills it. A value that contradicts the step (a fixed micro batch size other than ``batch``)
    is transformers' mismatch error, as a ``SpecError``."""
    from transformers.integrations.deepspeed import (
        HfTrainerDeepSpeedConfig,
        unset_hf_deepspeed_config,
    )

    config = load(spec.deepspeed)
    accumulation = config.get("gradient_accumulation_steps", 1)
    args = types.SimpleNamespace(
        world_size=spec.ranks,
        per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=accumulation if isinstance(accumulation, int) else 1,
        max_grad_norm=_MAX_GRAD_NORM,
        learning_rate=spec.optimizer_option("lr"),
        adam_beta1=_ADAM_BETAS[0],
        adam_beta2=_ADAM_BETAS[1],
        adam_epsilon=_ADAM_EPSILON,
        weight_decay=_weight_decay(spec),
        save_on_each_node=False,
        fp16=spec.precision == "fp16",
        fp16_full_eval=False,
        bf16=spec.precision == "bf16",
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )
    hf = HfTrainerDeepSpeedConfig(config)  # type: ignore[no-untyped-call]
    try:
        hf.trainer_config_process(args)  # type: ignore[no-untyped-call]
        hf.trainer_config_finalize(args, model, spec.steps)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        # One line, naming the keys: a rank's failure shows the first line of its error, and
        # transformers' list of mismatches starts with a heading.
        mismatches = [
            line.removeprefix("- ds ").replace(" vs hf ", " vs the step's ")
            for line in getattr(hf, "mismatches", [])
        ]
        if not mismatches:
            raise SpecError(f"deepspeed: {' '.join(str(exc).split())}") from None
        raise SpecError(
            f"deepspeed: {'; '.join(mismatches)} (in TrainingArguments' terms); set them to "
            '"auto" or to the step\'s values'
        ) from None
    finally:
        # The config object registers itself globally (for from_pretrained's zero.Init): the
        # model is built already, and later cases in this process must not see it.
        unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    resolved: dict[str, Any] = hf.config
    left = list(_autos(resolved))
    if left:
        raise SpecError(f'deepspeed: no value to fill in for {", ".join(left)} ("auto")')
    return resolved


def _autos(config: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The keys still "auto": ones transformers' Trainer does not fill either."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def _weight_decay(spec: StepSpec) -> Any:
    from pytest_vram import methods

    options = methods.OPTIMIZERS[spec.optimizer].options
    return spec.optimizer_option("weight_decay") if "weight_decay" in options else 0.0
