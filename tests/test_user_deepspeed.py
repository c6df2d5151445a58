"""deepspeed=: the user's DeepSpeed config, run as written, "auto" filled in as Trainer does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pytest_vram import SpecError, StepSpec
from pytest_vram.zero import user_config

DATA = Path(__file__).parents[1] / "suites" / "data" / "llama_factory"
Z3 = DATA / "ds_z3_config.json"
Z3_OFFLOAD = DATA / "ds_z3_offload_config.json"


def test_the_config_sets_zero_and_offload_and_the_label() -> None:
    spec = StepSpec(model="tiny-llama", method="lora", deepspeed=str(Z3_OFFLOAD), ranks=2)
    assert (spec.zero, spec.offload) == (3, "both")
    plain = StepSpec(model="tiny-llama", method="lora", deepspeed=str(Z3), ranks=2)
    assert (plain.zero, plain.offload) == (3, "none")
    assert "zero3 offload-both r2" in spec.label and " ds@" in spec.label
    assert spec.label.split(" ds@")[1][:8] != plain.label.split(" ds@")[1][:8]
    # The spec keeps the config itself: a baseline entry re-reads it without the file.
    assert StepSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.deepspeed) == json.loads(Z3_OFFLOAD.read_text())


def test_a_dict_is_the_same_config_as_its_file() -> None:
    from_dict = StepSpec(model="tiny-llama", deepspeed=json.loads(Z3.read_text()))
    assert from_dict == StepSpec(model="tiny-llama", deepspeed=str(Z3))
    assert "deepspeed" not in StepSpec(model="tiny-llama").to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero": 2}, r"zero=2 contradicts deepspeed=, whose config gives zero=3"),
        ({"offload": "optimizer"}, r"offload='optimizer' contradicts deepspeed=.* offload='none'"),
    ],
)
def test_shorthands_that_contradict_the_config_name_both(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        StepSpec(model="tiny-llama", deepspeed=str(Z3), **kwargs)
    assert StepSpec(model="tiny-llama", deepspeed=str(Z3), zero=3).zero == 3


def with_zero(**zero: Any) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(Z3.read_text())
    config["zero_optimization"].update(zero)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            with_zero(offload_param={"device": "nvme"}),
            r"zero_optimization.offload_param.device='nvme' is not run",
        ),
        (with_zero(offload_optimizer={"device": "gpu"}), r"offload_optimizer.device='gpu' must be"),
        (with_zero(stage=4), r"zero_optimization.stage=4 must be 0, 1, 2 or 3"),
        ({**with_zero(), "optimizer": {"type": "AdamW"}}, r"an 'optimizer' section"),
        ({"zero_optimization": [3]}, r"zero_optimization=\[3\] must be an object"),
        ([1, 2], r"must be a path to a DeepSpeed JSON config or a dict"),
    ],
)
def test_what_cannot_run_is_refused_naming_the_key(config: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        StepSpec(model="tiny-llama", deepspeed=config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # was found only in the rank, under transformers' text
        ({"bf16": {"enabled": "maybe"}}, "deepspeed: bf16.enabled='maybe' must be true, false"),
        ({"fp16": True}, """deepspeed: fp16=True must be an object, e.g. {"enabled": "auto"}"""),
        (
            {"train_micro_batch_size_per_gpu": "2"},
            "deepspeed: train_micro_batch_size_per_gpu='2' must be an integer >= 1 (below 2**63) "
            'or "auto"',
        ),
        (
            {"gradient_accumulation_steps": 0},
            "deepspeed: gradient_accumulation_steps=0 must be an integer >= 1",
        ),
        ({"train_batch_size": 2.5}, "deepspeed: train_batch_size=2.5 must be an integer >= 1"),
        (
            {"gradient_clipping": "1.0"},
            "deepspeed: gradient_clipping='1.0' must be a number >= 0 (below 2**63) or \"auto\"",
        ),
        (
            {"zero_optimization": {"stage": 3, "reduce_bucket_size": "5e8"}},
            "deepspeed: zero_optimization.reduce_bucket_size='5e8' must be a number >= 0",
        ),
        (
            {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": True}},
            "deepspeed: zero_optimization.stage3_prefetch_bucket_size=True must be a number",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": [1e-5]}}},
            "deepspeed: scheduler.params.warmup_max_lr=[1e-05] must be a number >= 0",
        ),
    ],
    ids=["bf16", "fp16", "micro", "accumulation", "batch", "clip", "bucket", "prefetch", "lr"],
)
def test_a_value_transformers_fills_has_its_type_at_spec_time(
    changes: dict[str, Any], message: str
) -> None:
    """Checked in the pytest process, torch-free, so the first line names the key; it was
    found in the rank, under transformers' mismatch text."""
    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", deepspeed={**json.loads(Z3.read_text()), **changes})
    first = str(info.value).splitlines()[0]
    assert first.startswith(message), first


def test_values_of_the_right_type_are_taken_as_written() -> None:
    config = {
        **json.loads(Z3.read_text()),
        "bf16": {"enabled": True},
        "fp16": None,  # transformers and DeepSpeed read null as not given
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8},
    }
    spec = StepSpec(model="tiny-llama", batch=2, deepspeed=config)
    assert json.loads(spec.deepspeed) == config


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=r"deepspeed='.*ds.json': not a readable DeepSpeed JSON"):
        StepSpec(model="tiny-llama", deepspeed=str(bad))


def test_auto_is_filled_as_trainer_fills_it() -> None:
    pytest.importorskip("deepspeed", reason="resolving a config needs pytest-vram[zero]")
    import torch

    from pytest_vram import zoo

    spec = StepSpec(model="tiny-llama", batch=2, deepspeed=str(Z3_OFFLOAD), ranks=2)
    model = zoo.build_model("tiny-llama", torch.bfloat16)
    config = user_config.resolve(spec, model)
    hidden = 256  # tiny-llama's hidden_size
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (2, 4)
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    # Everything else as written.
    assert zero["stage3_max_live_parameters"] == 1e9 and zero["sub_group_size"] == 1e9
    assert "auto" not in json.dumps(config)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # nothing left registered for later cases


def test_a_fixed_value_that_contradicts_the_step_is_transformers_mismatch() -> None:
    pytest.importorskip("deepspeed", reason="resolving a config needs pytest-vram[zero]")
    import torch

    from pytest_vram import zoo

    config = {**json.loads(Z3.read_text()), "train_micro_batch_size_per_gpu": 8}
    spec = StepSpec(model="tiny-llama", batch=2, deepspeed=config)
    with pytest.raises(SpecError) as info:
        user_config.resolve(spec, zoo.build_model("tiny-llama", torch.bfloat16))
    # one line that names the key: a rank's failure shows the first line of its error
    assert str(info.value) == (
        "deepspeed: train_micro_batch_size_per_gpu=8 vs the step's "
        'per_device_train_batch_size=2 (in TrainingArguments\' terms); set them to "auto" '
        "or to the step's values"
    )


USER_STACK = """
import json

import pytest


@pytest.mark.vram_budget(gb=1, model="tiny-llama", method="lora", batch=2, seq=64)
def test_our_zero3_offload_config(vram):
    off = vram.step(deepspeed="ds/ds_z3_offload_config.json", ranks=2)
    plain = vram.step(deepspeed="ds/ds_z3_config.json", ranks=2)
    assert off.host_offload_bytes > 0 == plain.host_offload_bytes
    vram.assert_le(off, plain)  # offload must not raise device memory, on any rank
    zero = off.zero_config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 256 * 256 and "auto" not in json.dumps(off.zero_config)
    print("PEAKS", [r.peak_bytes for r in off.ranks], [r.peak_bytes for r in plain.ranks])
    print("HOST", off.host_offload_bytes)
"""


def test_the_llama_factory_pair_on_two_ranks(pytester: pytest.Pytester) -> None:
    pytest.importorskip("deepspeed", reason="ZeRO cases need pytest-vram[zero]")
    shutil.copytree(DATA, pytester.path / "ds")
    pytester.makepyfile(test_stack=USER_STACK)
    result = pytester.runpytest("-p", "no:cacheprovider", "--vram-update", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PEAKS *", "HOST *"])
