"""StepSpec: the one vocabulary from marker to baseline file.

A spec names everything that decides how much memory one training step takes. It is a frozen,
validated value that round-trips through JSON; nothing here imports torch, so the pytest parent
process can validate markers at collection without paying for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

from pytest_vram import methods, model_configs, zoo
from pytest_vram.errors import SpecError
from pytest_vram.methods import OptionValue

__all__ = [
    "ATTENTIONS",
    "OFFLOADS",
    "PRECISIONS",
    "STAGES",
    "SpecError",
    "StepSpec",
    "check_field",
    "unknown_name",
]

PRECISIONS: Final = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
# transformers' attn_implementation: sdpa keeps O(seq) per head (flash / memory-efficient
# kernels); eager materialises the seq x seq scores and an fp32 softmax of them.
ATTENTIONS: Final = ("sdpa", "eager")
STAGES: Final = ("sft", "dpo")
ZERO_STAGES: Final = (0, 1, 2, 3)
OFFLOADS: Final = ("none", "optimizer", "param", "both")
# The ZeRO stages that can offload each part, and why the others cannot.
_NO_PARAMS: Final = "only ZeRO-3 partitions parameters"
OFFLOAD_STAGES: Final = {
    "optimizer": ((1, 2, 3), "ZeRO-0 does not partition the optimizer state"),
    "param": ((3,), _NO_PARAMS),
    "both": ((3,), _NO_PARAMS),
}

Options = tuple[tuple[str, OptionValue], ...]


def _known(kind: str, value: object, known: Mapping[str, object] | tuple[str, ...]) -> SpecError:
    names = ", ".join(sorted(known))
    return SpecError(f"unknown {kind} {value!r}; known: {names}")


def _is_one_of(value: object, known: Mapping[str, object] | tuple[str, ...]) -> bool:
    # A name is a string: a list or dict given instead must be refused, not hashed (TypeError).
    return isinstance(value, str) and value in known


def unknown_name(what: str, name: str, known: Sequence[str]) -> SpecError:
    """``unknown <what>``, with where it belongs (a method's or optimizer's option, such as
    ``rank``) or else the closest known name (a typo), then the whole list."""
    hint = _option_hint(name)
    if hint is None:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}?" if close else ""
    return SpecError(f"unknown {what}; {hint + ' ' if hint else ''}known: {', '.join(known)}")


def _option_hint(name: str) -> str | None:
    places = []
    for field, registry in (
        ("method_options", methods.METHODS),
        ("optimizer_options", methods.OPTIMIZERS),
    ):
        owners = [owner for owner, part in registry.items() if name in part.options]
        if owners:
            shown = ", ".join(owners[:3]) + (", ..." if len(owners) > 3 else "")
            places.append(f"{field}={{{name!r}: ...}} ({shown})")
    return f"an option: write {' or '.join(places)};" if places else None


def _either(values: Sequence[int]) -> str:
    """``1, 2 or 3``; ``3``."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


# Far beyond any real run, and small enough that every shape and byte count torch derives from
# them fits int64 (seq=10**30 overflowed in torch.randint): the longest published context is 10M
# tokens, a case is a few steps, ranks are processes on one machine, and a step of 2**32 tokens
# (batch x seq) holds more activations than any device.
_MAX: Final = {"batch": 2**20, "seq": 2**24, "steps": 10_000, "ranks": 1024}
_MAX_TOKENS: Final = 2**32


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r} must be an integer")
    if value < 1:
        raise SpecError(f"{name}={value!r} must be >= 1")
    if value > _MAX[name]:
        raise SpecError(f"{name}={value!r} must be at most {_MAX[name]:,}")
    return value


def _options(name: str, value: object, declared: Mapping[str, OptionValue], owner: str) -> Options:
    """Options are validated against what the method/optimizer declares, then frozen sorted."""
    given = value
    if isinstance(value, tuple):  # the frozen form, from a spec: (name, value) pairs only
        # dict() would also take any 2-character strings as pairs: ("ab",) is {"a": "b"};
        # and a name must be a string: ([], 1) would not even be a key
        pairs = all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in value)
        value = dict(value) if pairs else None
    if not isinstance(value, Mapping):
        raise SpecError(f"{name}={given!r} must be a mapping of option name to value")
    for key in value:  # before sorting: keys of mixed types do not sort
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise SpecError(f"{name}: {owner} has no option {key!r}; its options: {known}")
    frozen: list[tuple[str, OptionValue]] = []
    for key, val in sorted(value.items()):
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
    if name == "model":
        if not _is_one_of(value, zoo.MODELS):
            if not isinstance(value, str) or model_configs.is_key(value):
                raise _known("model", value, tuple(model_configs.zoo_names()))
            model_configs.read(value)  # a config of the user's: readable, or a SpecError
    elif name == "deepspeed":
        if value != "":
            from pytest_vram.zero import user_config

            user_config.stage_and_offload(user_config.load(value))
    elif name == "model_config":
        if not isinstance(value, str):
            raise SpecError(f"model_config={value!r} must be the config's JSON text")
    elif name == "method":
        if not _is_one_of(value, methods.METHODS):
            raise _known("method", value, methods.METHODS)
    elif name == "optimizer":
        if not _is_one_of(value, methods.OPTIMIZERS):
            raise _known("optimizer", value, methods.OPTIMIZERS)
    elif name == "precision":
        if not _is_one_of(value, PRECISIONS):
            raise _known("precision", value, PRECISIONS)
    elif name == "stage":
        if not _is_one_of(value, STAGES):
            raise _known("stage", value, STAGES)
    elif name in _MAX:
        return _positive_int(name, value)
    elif name == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"seed={value!r} must be an integer >= 0")
        if value >= 2**63:  # torch's generators take an int64
            raise SpecError(f"seed={value!r} must be below 2**63 ({2**63:,})")
    elif name == "attention":
        if not _is_one_of(value, ATTENTIONS):
            raise _known("attention", value, ATTENTIONS)
    elif name == "grad_ckpt":
        if not isinstance(value, bool):
            raise SpecError(f"grad_ckpt={value!r} must be True or False")
    elif name == "zero":
        # an int: 1.0 == 1 would pass a plain `in`, and label the case zero1.0
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value not in ZERO_STAGES
        ):
            raise SpecError(
                f"zero={value!r} must be one of 0, 1, 2, 3 (DeepSpeed ZeRO stage) or None"
            )
    elif name == "offload":
        if not _is_one_of(value, OFFLOADS):
            raise _known("offload", value, OFFLOADS)
    elif name not in ("method_options", "optimizer_options"):
        raise unknown_name(f"step argument {name!r}", name, FIELDS)
    return value


@final
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One training step to measure."""

    model: str
    method: str = "full"
    optimizer: str = "adamw"
    precision: str = "bf16"
    batch: int = 1
    seq: int = 128
    grad_ckpt: bool = False
    attention: str = "sdpa"
    # Optimizer state appears during step 1; step 2 is what steady training costs.
    steps: int = 2
    seed: int = 0
    stage: str = "sft"
    method_options: Options = ()
    optimizer_options: Options = ()
    # DeepSpeed: ZeRO stage (None: no DeepSpeed), what is offloaded to host, ranks (processes).
    zero: int | None = None
    offload: str = "none"
    ranks: int = 1
    # The user's DeepSpeed config (a path or a dict; kept as its canonical JSON), which sets
    # zero and offload; "auto" values are filled in the rank as transformers' Trainer does.
    deepspeed: str = ""
    # A model of the user's own config: its canonical JSON, ``model`` its key (model_configs).
    model_config: str = ""

    def __post_init__(self) -> None:
        if self.deepspeed != "":
            self._take_deepspeed()
        if self.model_config:
            model_configs.register(self.model, self.model_config)
        elif isinstance(self.model, str) and self.model not in zoo.MODELS:
            if not model_configs.is_key(self.model):
                key, text = model_configs.read(self.model)
                object.__setattr__(self, "model", key)
                object.__setattr__(self, "model_config", text)
                model_configs.register(key, text)
        # options are checked against their owner below; deepspeed and model_config were read
        # and entered above
        skipped = ("method_options", "optimizer_options", "deepspeed", "model_config")
        for field in dataclasses.fields(self):
            if field.name not in skipped:
                check_field(field.name, getattr(self, field.name))
        if (tokens := self.batch * self.seq) > _MAX_TOKENS:
            at_most = f"{tokens:,} tokens a step; at most {_MAX_TOKENS:,}"
            raise SpecError(f"batch={self.batch} x seq={self.seq} is {at_most}")
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
        reason = self._zero_incompatible()
        if reason:
            raise SpecError(reason)

    def _take_deepspeed(self) -> None:
        from pytest_vram.zero import user_config

        config = user_config.load(self.deepspeed)
        stage, offload = user_config.stage_and_offload(config)
        for name, given, read in (("zero", self.zero, stage), ("offload", self.offload, offload)):
            unset = given is None if name == "zero" else given == "none"
            if not unset and given != read:
                raise SpecError(
                    f"{name}={given!r} contradicts deepspeed=, whose config gives {name}={read!r}; "
                    f"give one of them"
                )
        object.__setattr__(self, "deepspeed", user_config.canonical(config))
        object.__setattr__(self, "zero", stage)
        object.__setattr__(self, "offload", offload)

    def _zero_incompatible(self) -> str | None:
        if self.offload in OFFLOAD_STAGES:
            # The stages that work, whether zero is missing or too low: one message for both.
            stages, why = OFFLOAD_STAGES[self.offload]
            if self.zero not in stages:
                got = "None (no DeepSpeed)" if self.zero is None else f"{self.zero} ({why})"
                return f"offload={self.offload!r} needs zero={_either(stages)}; got zero={got}"
        if self.zero is None:
            if self.ranks != 1:
                return f"ranks={self.ranks} needs zero={_either(ZERO_STAGES)}; got zero=None (no DeepSpeed)"
            return None
        for what, name, registry in (
            ("methods", self.method, methods.METHODS),
            ("optimizers", self.optimizer, methods.OPTIMIZERS),
        ):
            if not registry[name].runs_under_zero:
                runs = ", ".join(n for n, part in registry.items() if part.runs_under_zero)
                return f"zero={self.zero} runs {what} {runs}; not {name!r}"
        if self.stage != "sft":
            return f"zero={self.zero} runs stage 'sft'; not {self.stage!r}"
        if self.precision.startswith("amp-"):
            return f"zero={self.zero} with precision={self.precision!r}: DeepSpeed keeps its own master weights; use bf16, fp16 or fp32"
        return None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> StepSpec:
        for name in kwargs:
            if name not in FIELDS and name != "model_config":
                raise unknown_name(f"step argument {name!r}", name, FIELDS)
        if "model" not in kwargs:
            raise SpecError("model is required, e.g. model='tiny-llama'")
        return cls(**kwargs)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # The worker child enters a model of the user's config in its own zoo on the way in;
        # the rest was validated here, and the user's registered methods are not imported
        # there yet when the job is unpickled.
        return (_restore, (dict(self.__dict__),))

    def method_option(self, name: str) -> Any:
        return dict(self.method_options).get(name, methods.METHODS[self.method].options[name])

    def optimizer_option(self, name: str) -> Any:
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
        if self.attention != "sdpa":
            parts.append(self.attention)
        if self.deepspeed:
            digest = hashlib.sha256(self.deepspeed.encode()).hexdigest()[:8]
            parts.append(f"ds@{digest}")
        if self.zero is not None:
            parts.append(f"zero{self.zero}")
            if self.offload != "none":
                parts.append(f"offload-{self.offload}")
            parts.append(f"r{self.ranks}")
        if self.steps != 2:
            parts.append(f"x{self.steps}")
        if self.seed:
            parts.append(f"seed{self.seed}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("model_config", "deepspeed"):  # baselines as before these fields
            if not data[optional]:
                del data[optional]
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


def _restore(state: dict[str, Any]) -> StepSpec:
    if state.get("model_config"):
        model_configs.register(state["model"], state["model_config"])
    spec = object.__new__(StepSpec)
    for name, value in state.items():
        object.__setattr__(spec, name, value)
    return spec


def _fmt_value(value: OptionValue) -> str:
    return "+".join(value) if isinstance(value, tuple) else str(value)


def _jsonable(value: OptionValue) -> Any:
    return list(value) if isinstance(value, tuple) else value


# What a marker or vram.step() takes; model_config is written by the spec itself.
FIELDS: Final = tuple(f.name for f in dataclasses.fields(StepSpec) if f.name != "model_config")
