"""StepSpec: validation that names the bad value, JSON round-trip, labels."""

from __future__ import annotations

import json

import pytest

from pytest_vram import StepSpec
from pytest_vram.errors import SpecError


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
        # a LoRA option, not a misspelt ranks=
        (
            {"model": "tiny-llama", "rank": 8},
            "unknown step argument 'rank'; an option: write method_options={'rank': ...} "
            "(lora, dora, pissa, ...) or optimizer_options={'rank': ...} (galore-adamw, ",
        ),
        (
            {"model": "tiny-llama", "bacth": 2},
            "unknown step argument 'bacth'; did you mean batch? known: model, method, ",
        ),
        ({"model": "tiny-llama", "colour": 1}, "unknown step argument 'colour'; known: model, "),
        # not a name: refused, not hashed (a TypeError before)
        ({"model": ["tiny-llama"]}, "unknown model ['tiny-llama']; known: "),
        ({"model": "tiny-llama", "method": {"lora": 1}}, "unknown method {'lora': 1}; known: "),
        ({"model": "tiny-llama", "zero": 1.0}, "zero=1.0 must be one of 0, 1, 2, 3"),
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
        # keys that do not sort together, pairs that are not pairs (TypeError, ValueError before)
        (
            {"model": "tiny-llama", "method": "lora", "method_options": {1: 2, "rank": 8}},
            "method_options: lora has no option 1; its options: alpha, dropout, rank, targets",
        ),
        (
            {"model": "tiny-llama", "method_options": ((1, 2, 3),)},
            "method_options=((1, 2, 3),) must be a mapping of option name to value",
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


@pytest.mark.parametrize(
    ("offload", "zero", "message"),
    [
        (
            "optimizer",
            None,
            "offload='optimizer' needs zero=1, 2 or 3; got zero=None (no DeepSpeed)",
        ),
        (
            "optimizer",
            0,
            "offload='optimizer' needs zero=1, 2 or 3; got zero=0 "
            "(ZeRO-0 does not partition the optimizer state)",
        ),
        ("param", None, "offload='param' needs zero=3; got zero=None (no DeepSpeed)"),
        ("both", None, "offload='both' needs zero=3; got zero=None (no DeepSpeed)"),
        (
            "param",
            1,
            "offload='param' needs zero=3; got zero=1 (only ZeRO-3 partitions parameters)",
        ),
        ("both", 2, "offload='both' needs zero=3; got zero=2 (only ZeRO-3 partitions parameters)"),
    ],
)
def test_offload_names_the_zero_stages_that_work(
    offload: str, zero: int | None, message: str
) -> None:
    """The first message already gives the stages that work: none asks for a second try."""
    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", offload=offload, zero=zero)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("offload", "zero"),
    [("optimizer", 1), ("optimizer", 2), ("optimizer", 3), ("param", 3), ("both", 3)],
)
def test_offload_with_a_stage_that_works_is_a_spec(offload: str, zero: int) -> None:
    assert StepSpec(model="tiny-llama", offload=offload, zero=zero).zero == zero


def test_ranks_without_zero_names_the_stages() -> None:
    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", ranks=2)
    assert str(info.value) == "ranks=2 needs zero=0, 1, 2 or 3; got zero=None (no DeepSpeed)"


def test_options_given_as_a_tuple_must_be_name_value_pairs() -> None:
    # dict(("00", "00")) would read each 2-character string as a pair: {"0": "0"}.
    with pytest.raises(SpecError, match=r"method_options=\('00', '00'\) must be a mapping"):
        StepSpec(model="tiny-llama", method_options=("00", "00"))
    spec = StepSpec(model="tiny-llama", method="lora", method_options=(("rank", 4),))
    assert spec.method_option("rank") == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # each reached torch before and crashed inside the case (an overflow in randint or
        # manual_seed)
        ({"seq": 10**30}, f"seq={10**30} must be at most 16,777,216"),
        ({"seed": 2**80}, f"seed={2**80} must be below 2**63 (9,223,372,036,854,775,808)"),
        ({"batch": 2**20 + 1}, "batch=1048577 must be at most 1,048,576"),
        ({"steps": 10_001}, "steps=10001 must be at most 10,000"),
        ({"zero": 3, "ranks": 1025}, "ranks=1025 must be at most 1,024"),
        (
            {"batch": 2**16, "seq": 2**17},
            "batch=65536 x seq=131072 is 8,589,934,592 tokens a step; at most 4,294,967,296",
        ),
    ],
    ids=["seq", "seed", "batch", "steps", "ranks", "tokens"],
)
def test_integers_beyond_any_real_run_are_refused_naming_the_limit(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        StepSpec.from_kwargs(model="tiny-llama", **kwargs)
    assert message in str(info.value)


def test_the_largest_accepted_integers_fit_torch_int64() -> None:
    from pytest_vram import marker

    spec = StepSpec(model="tiny-llama", seed=2**63 - 1, seq=2**24, batch=2**8, steps=10_000)
    # the inputs of a DPO step are twice the batch; a shape and a seed are int64 in torch
    assert 2 * spec.batch * spec.seq < 2**63 and spec.seed < 2**63
    assert StepSpec(model="tiny-llama", batch=2**20, seq=2**12).batch == 2**20
    assert StepSpec(model="tiny-llama", zero=3, ranks=1024).ranks == 1024
    # vram.measure(fn, ranks=N) is checked by the same rule
    assert marker.check_ranks(1024) == 1024
    with pytest.raises(SpecError, match="ranks=1025 must be at most 1,024"):
        marker.check_ranks(1025)
