"""ZeRO: the DeepSpeed config a spec runs with, spec validation, combining ranks, and the
offload bug LLaMA-Factory users measured on 8 GPUs injected into a real run."""

from __future__ import annotations

import pytest

from conftest import output
from pytest_vram import StepSpec
from pytest_vram.errors import SpecError
from pytest_vram.result import Breakdown, MemoryResult

ds = pytest.importorskip("deepspeed", reason="ZeRO cases need pytest-vram[zero]")

from pytest_vram.ranks import combine  # noqa: E402
from pytest_vram.zero.config import ds_config  # noqa: E402


def spec(**kw: object) -> StepSpec:
    return StepSpec(model="tiny-llama", batch=2, seq=64, **kw)  # type: ignore[arg-type]


def test_buckets_are_sized_to_the_model_and_recorded() -> None:
    config = ds_config(spec(zero=3, ranks=2), largest_param_numel=524_288)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 524_288
    assert zero["stage3_param_persistence_threshold"] == 0  # else tiny models stay whole
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_force_ds_cpu_optimizer"] is False  # keep the client optimizer


@pytest.mark.parametrize(
    ("offload", "keys"),
    [
        ("none", set()),
        ("optimizer", {"offload_optimizer"}),
        ("param", {"offload_param"}),
        ("both", {"offload_optimizer", "offload_param"}),
    ],
)
def test_offload_choices_map_to_deepspeed_keys(offload: str, keys: set[str]) -> None:
    zero = ds_config(spec(zero=3, offload=offload), 1000)["zero_optimization"]
    assert {k for k in zero if k.startswith("offload")} == keys
    for key in keys:
        assert zero[key]["device"] == "cpu"


def test_stage_1_and_2_have_no_stage_3_keys() -> None:
    zero = ds_config(spec(zero=1, precision="fp32"), 1000)["zero_optimization"]
    assert not [k for k in zero if k.startswith("stage3")]
    assert zero["reduce_bucket_size"] == 2**16  # a floor, so tiny layers do not flush per param


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ranks": 2}, "ranks=2 needs zero=0, 1, 2 or 3; got zero=None (no DeepSpeed)"),
        ({"zero": 4}, "zero=4 must be one of 0, 1, 2, 3"),
        (
            {"zero": 2, "offload": "param"},
            "offload='param' needs zero=3; got zero=2 (only ZeRO-3 partitions parameters)",
        ),
        (
            {"zero": 0, "offload": "optimizer"},
            "offload='optimizer' needs zero=1, 2 or 3; got zero=0",
        ),
        ({"offload": "optimizer"}, "offload='optimizer' needs zero=1, 2 or 3; got zero=None"),
        (
            {"zero": 2, "offload": "nvme"},
            "unknown offload 'nvme'; known: both, none, optimizer, param",
        ),
        ({"zero": 2, "ranks": 0}, "ranks=0 must be >= 1"),
        (
            {"zero": 2, "method": "dora"},
            "zero=2 runs methods full, freeze, lora, qlora; not 'dora'",
        ),
        ({"zero": 2, "optimizer": "lomo"}, "zero=2 runs optimizers adamw, sgd; not 'lomo'"),
        ({"zero": 2, "precision": "amp-bf16"}, "DeepSpeed keeps its own master weights"),
    ],
)
def test_bad_zero_specs_name_the_value(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(**kw)


def test_label_names_stage_offload_and_ranks() -> None:
    assert spec(zero=3, offload="both", ranks=4).label.endswith("zero3 offload-both r4")
    assert spec(zero=1, ranks=2).label.endswith("zero1 r2")
    assert StepSpec.from_json(spec(zero=3, offload="both", ranks=4).to_json()) == spec(
        zero=3, offload="both", ranks=4
    )


def _rank(peak: int, steps: tuple[int, ...], host: int) -> MemoryResult:
    return MemoryResult(
        "r",
        "host",
        "host-cpu",
        peak,
        steps,
        Breakdown(activation_bytes=peak),
        host_offload_bytes=host,
    )


def test_combine_takes_the_worst_rank_and_sums_host_memory() -> None:
    s = spec(zero=2, ranks=2)
    r = combine(s.label, [_rank(10, (9, 10), 3), _rank(12, (12, 8), 4)])
    assert r.peak_bytes == 12 and r.breakdown.activation_bytes == 12
    assert r.step_peak_bytes == (12, 10)  # per step, the max over ranks
    assert r.host_offload_bytes == 7  # the ranks of one machine share its host memory
    assert [x.peak_bytes for x in r.ranks] == [10, 12] and r.label == s.label
    assert MemoryResult.from_json(r.to_json()) == r  # ranks survive the trip to the parent


# The bug LLaMA-Factory users measured on 8 GPUs (Juejin article, 2025): LoRA on ZeRO-3 with everything offloaded used 188.8 GB of GPU memory where
# the same run without offload used 75.4 GB. This patch of DeepSpeed does what such a bug does:
# after each step it keeps a gathered, full copy of the weights on the device.
BUG = """
import deepspeed
from deepspeed.runtime.engine import DeepSpeedEngine

_step = DeepSpeedEngine.step


def step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    if self.zero_offload_param():
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            self.kept_on_device = [p.detach().clone() for p in params]
    return out


DeepSpeedEngine.step = step
"""

INVARIANT = """
import pytest

@pytest.mark.vram_budget(gb=1, model="tiny-llama", batch=2, seq=64, method="lora", zero=3, ranks=2)
def test_offload_does_not_raise_device_memory(vram):
    offloaded = vram.step(offload="both")
    assert offloaded.host_offload_bytes > 0
    vram.assert_le(offloaded, vram.step(offload="none"))
"""


def test_the_suite_flags_offload_that_keeps_a_device_copy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ds_bug=BUG, test_offload=INVARIANT)
    args = ("-p", "no:cacheprovider", "--vram-update")
    pytester.runpytest(*args).assert_outcomes(passed=1)  # DeepSpeed as released
    result = pytester.runpytest(*args, "--vram-import", "ds_bug")
    result.assert_outcomes(failed=1)
    text = output(result)
    assert "expected peak of [tiny-llama lora adamw bf16 b2 s64 zero3 offload-both r2] <=" in text
    assert "[tiny-llama lora adamw bf16 b2 s64 zero3 r2] on rank 0" in text
    assert text.count(" MiB (") >= 2  # both numbers, in MiB and bytes
