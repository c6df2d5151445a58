"""The fake meter counts what the host meter counts, without data; what needs data is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Final

import pytest
import torch

from pytest_vram import StepSpec, errors, meters, methods, zoo
from pytest_vram.meters import make_meter
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter
from pytest_vram.step import run_step

SMALL = {"model": "tiny-llama", "batch": 2, "seq": 64}

CASES: list[dict[str, Any]] = [
    {"precision": "fp32"},
    {"precision": "bf16"},
    {"precision": "amp-bf16"},
    {"grad_ckpt": True},
    {"optimizer": "adafactor"},
    {"optimizer": "galore-adamw"},
    {"optimizer": "sgd"},  # its peak is in the forward pass, where transformers may build a mask
    {"method": "lora", "precision": "fp32"},
    {"method": "lora", "precision": "bf16"},
    {"method": "dora", "precision": "fp32"},
    {"method": "dora", "precision": "bf16"},
    {"method": "pissa"},
    {"method": "rslora"},
    {"method": "lora+"},
    {"method": "ia3"},
    {"method": "prefix"},
    {"method": "p-tuning"},
    {"method": "prompt"},
    {"method": "freeze"},
    {"optimizer": "badam"},
    {"method": "qlora"},
    {"method": "qlora", "method_options": {"double_quant": False}},
    {"method": "lora", "stage": "dpo"},
]


def _id(extra: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize("extra", CASES, ids=_id)
def test_fake_bytes_equal_host_bytes(extra: dict[str, Any]) -> None:
    spec = StepSpec(**SMALL, **extra)  # type: ignore[arg-type]
    assert FakeMeter.unsupported(spec) is None
    run_step(spec, HostMeter())  # first use of a library may leave a cached tensor: not the step
    host, fake = run_step(spec, HostMeter()), run_step(spec, FakeMeter())
    assert fake.device == "fake" and fake.meter == "fake"
    assert (fake.peak_bytes, fake.step_peak_bytes, fake.breakdown) == (
        host.peak_bytes,
        host.step_peak_bytes,
        host.breakdown,
    )
    assert (fake.total_params, fake.trainable_params) == (host.total_params, host.trainable_params)


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        ({"optimizer": "adamw-8bit"}, "bitsandbytes.functional.create_dynamic_map"),
        ({"model": "tiny-qwen2-vl"}, "transformers.vision_utils"),
        ({"method": "lora-8bit"}, "Tensor subclass"),
    ],
    ids=["adamw-8bit", "qwen2-vl", "lora-8bit"],
)
def test_what_needs_values_is_unsupported(extra: dict[str, Any], culprit: str) -> None:
    """Refused up front by ``unsupported`` (for collection), and at run time by name."""
    spec = StepSpec(**{**SMALL, **extra})
    assert "is not supported on the fake meter" in (FakeMeter.unsupported(spec) or "")
    with pytest.raises(errors.Unsupported, match="is not supported on the fake meter") as info:
        run_step(spec, FakeMeter())
    assert culprit in str(info.value)


LLAVA: Final = {
    "model_type": "llava",
    "image_token_id": 32000,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "patch_size": 14},
    "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 64},
}


def test_a_vision_language_config_is_refused_for_its_own_model_type(tmp_path: Path) -> None:
    """Qwen2-VL's reason (3-D rotary positions) was given for every config with a vision
    tower; a LLaVA model finds where its image features go by its token ids' values."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAVA))
    spec = StepSpec(model=str(path))
    assert FakeMeter.unsupported(spec) == (
        f"{spec.model} is not supported on the fake meter: a 'llava' vision-language model "
        "finds where its image features go by the values of its token ids (the image "
        "token's places); fake tensors hold no values"
    )
    qwen2_vl = FakeMeter.unsupported(StepSpec(model="tiny-qwen2-vl")) or ""
    assert "Qwen2-VL places its 3-D rotary positions" in qwen2_vl


def test_fake_is_a_meter_choice() -> None:
    meter = make_meter("fake")
    assert isinstance(meter, FakeMeter) and meter.fingerprint() == "fake"


def test_unsupported_is_decided_without_torch_for_collection() -> None:
    spec = StepSpec(model="llama-7b", optimizer="paged-adamw-8bit")
    reason = meters.unsupported("fake", spec)
    assert reason == FakeMeter.unsupported(spec)
    assert reason and reason.startswith("paged-adamw-8bit is not supported on the fake meter")
    assert meters.unsupported("host", spec) is None
    assert meters.unsupported("fake", StepSpec(model="qwen2.5-32b", method="qlora")) is None


def test_only_ramps_count_as_unpacked_positions() -> None:
    """transformers is told "not packed" only for positions the meter saw made consecutive."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    with FakeMeter():
        find = masking_utils.find_packed_sequence_indices
        assert find((torch.arange(8) + 3).unsqueeze(0).expand(2, -1)) is None
        assert find(torch.arange(0, 16, 2).unsqueeze(0)) is not None
        assert find(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])) is not None
        torch.nn.Linear(4, 4).to(torch.bfloat16)  # Module.to swaps fake parameters
    assert masking_utils.find_packed_sequence_indices is original
    assert torch.utils.swap_tensors.__module__ == "torch.utils"


def test_only_in_place_foreach_ops_and_fills_on_untracked_values_skip_fake_mode() -> None:
    """An optimizer's in-place foreach update and weight initialisation's fills allocate
    nothing and are not run; what allocates (``_foreach_sqrt``), other in-place arithmetic, and
    a step count whose value fake mode follows (read back by Adam's bias correction) still
    run. A skipped fill still returns the tensor it filled."""
    from pytest_vram.meters.fake_bridges import InertOps

    inert = InertOps()
    aten = torch.ops.aten
    with FakeMeter():
        weights = [torch.empty(4, 4), torch.empty(3)]
        steps = [torch.tensor(0.0), torch.tensor(0.0)]
        assert steps[0].constant is not None  # type: ignore[attr-defined]
        assert inert(aten._foreach_mul_.Scalar, (weights, 0.5))
        assert inert(aten._foreach_addcdiv_.Scalar, (weights, weights, weights, 1.0))
        assert not inert(aten._foreach_sqrt.default, (weights,))
        assert not inert(aten.mul_.Tensor, (weights[0], weights[0]))
        assert not inert(aten._foreach_add_.Scalar, (steps, 1))
        assert inert(aten.uniform_.default, (weights[0], -1.0, 1.0))
        assert inert(aten.zero_.default, (weights[1],))
        assert not inert(aten.fill_.Scalar, (steps[0], 3.0))
        assert not inert(aten.add_.Tensor, (weights[0], weights[0]))
        assert torch.nn.init.kaiming_uniform_(weights[0]) is weights[0]
        assert steps[1].fill_(3.0).item() == 3.0
        params = [torch.nn.Parameter(torch.empty(8, 8))]
        adam = torch.optim.AdamW(params, foreach=True)
        for _ in range(2):
            params[0].grad = torch.empty(8, 8)
            adam.step()
        assert adam.state[params[0]]["step"].item() == 2


def test_a_value_fake_mode_follows_is_read_without_a_trip_through_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adam reads each step count back for its bias correction: a fake tensor whose value fake
    mode follows answers ``item()`` from that value at the meter; one without a value still
    cannot be read (``run_step`` reports it as unsupported)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    item = torch.ops.aten._local_scalar_dense.default
    meter = FakeMeter()
    reached: list[Any] = []
    with meter:
        dispatch = meter._fake.dispatch
        monkeypatch.setattr(
            meter._fake, "dispatch", lambda f, *a: reached.append(f) or dispatch(f, *a)
        )
        assert torch.tensor(3.0).add_(1).item() == 4.0
        assert item not in reached
        with pytest.raises(DataDependentOutputException):
            torch.empty(1).item()
        assert item in reached


def test_a_module_to_that_changes_nothing_runs_no_op() -> None:
    """peft moves each new adapter to its base layer's device: where every tensor is there
    already, ``to()`` returns the module and no op reaches fake mode; a real change converts."""
    original = torch.nn.Module.to
    with FakeMeter() as meter:
        layer = torch.nn.Linear(4, 4)
        ops = meter.ledger.events.ops
        assert layer.to("cpu", torch.float32) is layer
        assert layer.to(torch.device("cpu")) is layer
        assert meter.ledger.events.ops == ops
        layer.to(torch.bfloat16)
        assert meter.ledger.events.ops > ops
        assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert torch.nn.Module.to is original


def test_llama_7b_model_states_without_weights() -> None:
    """LLaMA-7B, pure bf16 AdamW: 2 bytes per parameter for weights and gradients, 4 for the
    two moments, plus a 4-byte step counter per tensor; nothing is allocated for real."""
    r = run_step(StepSpec(model="llama-7b", batch=1, seq=512), FakeMeter())
    params = 6_738_415_616
    b = r.breakdown
    assert r.total_params == params
    assert b.param_bytes == b.grad_bytes == 2 * params
    tensors = 2 + 9 * 32 + 1  # embed, lm_head; 9 per layer (7 linears, 2 norms); final norm
    assert b.optimizer_bytes == 4 * params + 4 * tensors
    assert b.total_bytes == r.peak_bytes


def _nf4_bytes(n: int) -> tuple[int, int]:
    """(packed weight, constants) bitsandbytes stores for an n-element weight, NF4 with nested
    constants: quantize_4bit packs two values a byte and keeps one absmax per 64-value block
    (_ops.py fake kernel); the nested quantize_blockwise(blocksize=256) turns those into one uint8
    each plus one fp32 absmax per 256, and a copy of its 256-entry fp32 map; the NF4 table is 16
    fp32 and the nested offset one fp32 (functional.quantize_4bit / quantize_blockwise)."""
    blocks = math.ceil(n / 64)
    return (n + 1) // 2, blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4


def test_qlora_7b_base_weights_as_bitsandbytes_stores_them() -> None:
    from bitsandbytes.nn.modules import Linear4bit

    spec = StepSpec(model="llama-7b", method="qlora", batch=1, seq=512)
    config = zoo.build_config("llama-7b")
    h, i = config.hidden_size, config.intermediate_size
    shapes = [(h, h)] * 4 + [(h, i)] * 3  # q, k, v, o (32 heads of 32: k, v as big); MLP
    packed, constants = (
        sum(_nf4_bytes(a * b)[k] for a, b in shapes) * config.num_hidden_layers for k in (0, 1)
    )
    method = methods.METHODS["qlora"]
    with FakeMeter():
        model = method.build_model(spec, torch.bfloat16, "cpu")
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        weights = sum(m.weight.untyped_storage().nbytes() for m in layers)
        quant = sum(t.untyped_storage().nbytes() for t in method.state_tensors(model))
    assert len(layers) == 7 * config.num_hidden_layers  # lm_head stays bf16
    assert (weights, quant) == (packed, constants)
    assert packed + constants == 3_341_015_936  # 4.127 bits per quantized parameter
