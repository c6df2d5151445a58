"""StepSpec: the one vocabulary from marker to baseline file.

A spec names everything that decides how much memory one training step takes. It is a frozen,
validated value that round-trips through JSON; nothing here imports torch, so the pytest parent
process can validate markers at collection without paying for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Final, final

__all__ = ["PRECISIONS", "STAGES", "SpecError", "StepSpec", "check_field"]

PRECISIONS: Final = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
STAGES: Final = ("sft", "dpo")

OptionValue = int | float | str | bool | tuple[str, ...]
Options = tuple[tuple[str, OptionValue], ...]


class SpecError(ValueError):
    """A spec argument has a bad value; the message names the argument and the value."""


def _known(kind: str, value: object, known: Mapping[str, object] | tuple[str, ...]) -> SpecError:
    names = ", ".join(sorted(known))
    return SpecError(f"unknown {kind} {value!r}; known: {names}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r} must be an integer")
    if value < 1:
        raise SpecError(f"{name}={value!r} must be >= 1")
    return value


def _options(name: str, value: object, declared: Mapping[str, OptionValue], owner: str) -> Options:
    """Options are validated against what the method/optimizer declares, then frozen sorted."""
    if isinstance(value, tuple):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise SpecError(f"{name}={value!r} must be a mapping of option name to value")
    frozen: list[tuple[str, OptionValue]] = []
    for key, val in sorted(value.items()):
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise SpecError(f"{name}: {owner} has no option {key!r}; its options: {known}")
        val = _coerce(val, declared[key])
        if val is None:
            kind = type(declared[key]).__name__
            raise SpecError(f"{name}: option {key}={value[key]!r} of {owner} must be {kind}")
        frozen.append((key, val))
    return tuple(frozen)


def _coerce(val: object, default: OptionValue) -> OptionValue | None:
    """``val`` converted to the type of the declared default, or None when it cannot be."""
    if isinstance(default, bool) or isinstance(val, bool):
        return val if isinstance(val, bool) and isinstance(default, bool) else None
    if isinstance(default, str) and isinstance(val, (list, tuple)):
        # a list of names where one word (e.g. "all-linear") is the default
        return tuple(val) if val and all(isinstance(v, str) for v in val) else None
    if isinstance(default, float) and isinstance(val, int):
        return float(val)
    return val if isinstance(val, type(default)) else None


def check_field(name: str, value: object) -> object:
    """Validate one spec field on its own (marker arguments at collection); return it normalised."""
    from pytest_vram import methods, zoo

    if name == "model":
        if value not in zoo.MODELS:
            raise _known("model", value, zoo.MODELS)
    elif name == "method":
        if value not in methods.METHODS:
            raise _known("method", value, methods.METHODS)
    elif name == "optimizer":
        if value not in methods.OPTIMIZERS:
            raise _known("optimizer", value, methods.OPTIMIZERS)
    elif name == "precision":
        if value not in PRECISIONS:
            raise _known("precision", value, PRECISIONS)
    elif name == "stage":
        if value not in STAGES:
            raise _known("stage", value, STAGES)
    elif name in ("batch", "seq", "steps"):
        return _positive_int(name, value)
    elif name == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"seed={value!r} must be an integer >= 0")
    elif name == "grad_ckpt":
        if not isinstance(value, bool):
            raise SpecError(f"grad_ckpt={value!r} must be True or False")
    elif name not in ("method_options", "optimizer_options"):
        raise SpecError(f"unknown step argument {name!r}; known: {', '.join(FIELDS)}")
    return value


@final
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One training step to measure. Later issues add zero/offload/ranks fields."""

    model: str
    method: str = "full"
    optimizer: str = "adamw"
    precision: str = "bf16"
    batch: int = 1
    seq: int = 128
    grad_ckpt: bool = False
    # Optimizer state appears during step 1; step 2 is what steady training costs.
    steps: int = 2
    seed: int = 0
    stage: str = "sft"
    method_options: Options = ()
    optimizer_options: Options = ()

    def __post_init__(self) -> None:
        from pytest_vram import methods

        for field in dataclasses.fields(self):
            if field.name not in ("method_options", "optimizer_options"):
                check_field(field.name, getattr(self, field.name))
        method = methods.METHODS[self.method]
        optimizer = methods.OPTIMIZERS[self.optimizer]
        mopts = _options("method_options", self.method_options, method.options, self.method)
        oopts = _options(
            "optimizer_options", self.optimizer_options, optimizer.options, self.optimizer
        )
        object.__setattr__(self, "method_options", mopts)
        object.__setattr__(self, "optimizer_options", oopts)
        for part in (method, optimizer):
            reason = part.incompatible(self)
            if reason:
                raise SpecError(f"{self.method} with {self.optimizer}: {reason}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> StepSpec:
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise SpecError(f"unknown step argument {unknown[0]!r}; known: {', '.join(FIELDS)}")
        if "model" not in kwargs:
            raise SpecError("model is required, e.g. model='tiny-llama'")
        return cls(**kwargs)

    def method_option(self, name: str) -> Any:
        from pytest_vram import methods

        return dict(self.method_options).get(name, methods.METHODS[self.method].options[name])

    def optimizer_option(self, name: str) -> Any:
        from pytest_vram import methods

        declared = methods.OPTIMIZERS[self.optimizer].options
        return dict(self.optimizer_options).get(name, declared[name])

    @property
    def label(self) -> str:
        """Short human label, e.g. ``tiny-llama lora adamw bf16 b4 s128``."""

        def fmt(name: str, opts: Options) -> str:
            inner = ",".join(f"{k}={_fmt_value(v)}" for k, v in opts)
            return f"{name}({inner})" if opts else name

        parts = [
            *([self.stage] if self.stage != "sft" else []),
            self.model,
            fmt(self.method, self.method_options),
            fmt(self.optimizer, self.optimizer_options),
            self.precision,
            f"b{self.batch}",
            f"s{self.seq}",
        ]
        if self.grad_ckpt:
            parts.append("ckpt")
        if self.steps != 2:
            parts.append(f"x{self.steps}")
        if self.seed:
            parts.append(f"seed{self.seed}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method_options"] = {k: _jsonable(v) for k, v in self.method_options}
        data["optimizer_options"] = {k: _jsonable(v) for k, v in self.optimizer_options}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepSpec:
        return cls.from_kwargs(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StepSpec:
        return cls.from_dict(json.loads(text))


def _fmt_value(value: OptionValue) -> str:
    return "+".join(value) if isinstance(value, tuple) else str(value)


def _jsonable(value: OptionValue) -> Any:
    return list(value) if isinstance(value, tuple) else value


FIELDS: Final = tuple(f.name for f in dataclasses.fields(StepSpec))
