"""StepSpec: validation that names the bad value, JSON round-trip, labels."""

from __future__ import annotations

import json

import pytest

from pytest_vram import StepSpec
from pytest_vram.spec import SpecError


def test_defaults_and_label() -> None:
    spec = StepSpec(model="tiny-llama", method="lora", precision="bf16", batch=4, seq=128)
    assert spec.label == "tiny-llama lora adamw bf16 b4 s128"
    assert spec.steps == 2


def test_label_shows_options_and_non_defaults() -> None:
    spec = StepSpec(
        model="tiny-llama",
        method="lora",
        method_options={"rank": 16, "targets": ["q_proj", "v_proj"]},
        optimizer="sgd",
        optimizer_options={"momentum": 0.9},
        grad_ckpt=True,
        steps=3,
    )
    assert spec.label == (
        "tiny-llama lora(rank=16,targets=q_proj+v_proj) sgd(momentum=0.9) bf16 b1 s128 ckpt x3"
    )


def test_json_round_trip_is_equal_and_stable() -> None:
    spec = StepSpec(
        model="qwen2-0.5b", method="freeze", method_options={"trainable_layers": 3}, seq=64
    )
    text = spec.to_json()
    again = StepSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text
    assert json.loads(text)["method_options"] == {"trainable_layers": 3}


def test_option_order_does_not_change_the_spec() -> None:
    a = StepSpec(model="tiny-llama", method="lora", method_options={"rank": 4, "alpha": 8})
    b = StepSpec(model="tiny-llama", method="lora", method_options={"alpha": 8, "rank": 4})
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "gpt-9"}, "unknown model 'gpt-9'; known: deepseek-r1-distill-qwen-1.5b"),
        (
            {"model": "tiny-llama", "method": "magic"},
            "unknown method 'magic'; known: ",
        ),
        (
            {"model": "tiny-llama", "optimizer": "adam"},
            "unknown optimizer 'adam'; known: ",
        ),
        (
            {"model": "tiny-llama", "precision": "fp8"},
            "unknown precision 'fp8'; known: amp-bf16, amp-fp16, bf16, fp16, fp32",
        ),
        ({"model": "tiny-llama", "batch": 0}, "batch=0 must be >= 1"),
        ({"model": "tiny-llama", "seq": -5}, "seq=-5 must be >= 1"),
        ({"model": "tiny-llama", "steps": 0}, "steps=0 must be >= 1"),
        ({"model": "tiny-llama", "batch": 2.5}, "batch=2.5 must be an integer"),
        ({"model": "tiny-llama", "grad_ckpt": "yes"}, "grad_ckpt='yes' must be True or False"),
        ({"model": "tiny-llama", "seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"model": "tiny-llama", "rank": 8}, "unknown step argument 'rank'"),
        ({"method": "lora"}, "model is required"),
        (
            {"model": "tiny-llama", "method": "lora", "method_options": {"r": 8}},
            "lora has no option 'r'; its options: alpha, dropout, rank, targets",
        ),
        (
            {"model": "tiny-llama", "method": "lora", "method_options": {"rank": "8"}},
            "option rank='8' of lora must be int",
        ),
        (
            {"model": "tiny-llama", "method_options": {"rank": 8}},
            "full has no option 'rank'; its options: none",
        ),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        StepSpec.from_kwargs(**kwargs)
    assert message in str(info.value)


def test_unknown_names_list_every_registered_one() -> None:
    from pytest_vram import methods

    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", method="magic")
    assert str(info.value).endswith(", ".join(sorted(methods.METHODS)))
    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", optimizer="adam")
    assert str(info.value).endswith(", ".join(sorted(methods.OPTIMIZERS)))


def test_float_option_accepts_int() -> None:
    spec = StepSpec(model="tiny-llama", optimizer="sgd", optimizer_options={"momentum": 1})
    assert spec.optimizer_option("momentum") == 1.0
    assert spec.optimizer_option("lr") == 1e-3  # the declared default


def test_attention_is_validated_and_labelled_when_not_sdpa() -> None:
    assert StepSpec(model="tiny-llama").attention == "sdpa"
    spec = StepSpec(model="tiny-llama", attention="eager", grad_ckpt=True)
    assert spec.label == "tiny-llama full adamw bf16 b1 s128 ckpt eager"
    assert StepSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="unknown attention 'flash'; known: eager, sdpa"):
        StepSpec(model="tiny-llama", attention="flash")
