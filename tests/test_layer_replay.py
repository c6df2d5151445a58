"""The fake meter replays repeated decoder layers from the first of each kind
(``meters.layers``): the same numbers as tracing every layer, for fewer dispatched operators.

Each case is held to two references: the host meter, which runs every layer of a tiny model
for real, and the fake meter itself with layer replay turned off, event for event, on a
real-size model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from traces import assert_same_trace

from pytest_vram import StepSpec, methods
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter
from pytest_vram.meters.layers import repeated_layers
from pytest_vram.methods.full import Full
from pytest_vram.result import MemoryResult
from pytest_vram.step import run_step

pytest.importorskip("peft")

CASES = [
    {"method": "full"},
    {"method": "full", "grad_ckpt": True, "steps": 3},
    {"method": "full", "precision": "fp32", "attention": "eager"},
    {"method": "freeze", "method_options": {"trainable_layers": 1}},
    {"method": "lora"},
    {"method": "lora", "grad_ckpt": True},
    {"method": "lora", "stage": "dpo"},
    {"method": "qlora", "grad_ckpt": True},
    {"method": "full", "optimizer": "galore-adamw"},
    # LOMO's update is a tensor hook on every parameter, run live where each gradient arrives.
    {"method": "full", "optimizer": "lomo"},
    {"method": "full", "optimizer": "lomo", "grad_ckpt": True, "precision": "fp16"},
]


def _numbers(result: MemoryResult) -> tuple[Any, ...]:
    return (
        result.peak_bytes,
        result.step_peak_bytes,
        result.breakdown,
        result.param_dtype_bytes,
        result.trainable_params,
    )


@pytest.mark.parametrize("fields", CASES, ids=lambda f: "-".join(map(str, f.values())))
def test_replayed_layers_measure_what_the_host_meter_runs(fields: dict[str, Any]) -> None:
    if fields["method"] == "qlora":
        pytest.importorskip("bitsandbytes")
    if fields.get("optimizer") == "galore-adamw":
        pytest.importorskip("galore_torch")
    if fields.get("optimizer") == "lomo":
        pytest.importorskip("lomo_optim")
    spec = StepSpec.from_kwargs(model="tiny-llama", batch=2, seq=64, **fields)
    meter = FakeMeter()
    fake = run_step(spec, meter)
    assert meter.replayed_layers > 0  # tiny-llama's 4 layers: at least one replayed
    assert _numbers(fake) == _numbers(run_step(spec, HostMeter()))


# LLaMA-7B's 32 layers: 31 replayed in the first step; the second step is replayed whole, or,
# for LOMO, whose update runs inside the backward, its 32 layers are replayed too.
@pytest.mark.parametrize(
    ("fields", "replayed_layers"),
    [
        ({"method": "full"}, 31),
        ({"method": "lora", "grad_ckpt": True}, 31),
        ({"method": "full", "optimizer": "lomo", "precision": "fp16", "attention": "eager"}, 63),
        # Qwen2's q, k and v projections have biases, which Linear4bit casts to the input's
        # dtype at its first call: each layer of the first step is replayed with its casts.
        ({"model": "qwen2.5-7b", "method": "qlora"}, 54),
    ],
    ids=lambda f: "-".join(map(str, f.values())) if isinstance(f, dict) else str(f),
)
def test_a_real_size_step_with_replayed_layers_is_the_traced_one_event_for_event(
    fields: dict[str, Any], replayed_layers: int
) -> None:
    spec = StepSpec.from_kwargs(**{"model": "llama-7b", "batch": 1, "seq": 32, **fields})
    # A library's first use in a process makes fake copies of its module-level tensors (the
    # NF4 table): made here, so that neither trace below has them.
    run_step(StepSpec(model="tiny-llama", method=spec.method), FakeMeter())
    traced = run_step(spec, without := FakeMeter(replay_layers=False))
    replayed = run_step(spec, with_replay := FakeMeter())
    assert (without.replayed_layers, with_replay.replayed_layers) == (0, replayed_layers)
    assert _numbers(replayed) == _numbers(traced)
    assert_same_trace(replayed, with_replay, traced, without)


# Each kind's first call is traced and the layer it left is probed: every later call is
# replayed, the first step's with the casts. Without checkpointing the first layer's input needs
# no gradient (frozen embeddings), which makes it a kind of its own.
@pytest.mark.parametrize(("grad_ckpt", "replayed_layers"), [(False, 2 + 4 + 4), (True, 3 + 4 + 4)])
def test_layers_that_cast_their_biases_at_their_first_call_are_replayed(
    tmp_path: Path, grad_ckpt: bool, replayed_layers: int
) -> None:
    """A tiny Qwen2 (biases on q, k and v) under QLoRA: each Linear4bit casts its fp32 bias to
    bf16 at its first call, and the replayed layers of the first step make those casts too."""
    pytest.importorskip("bitsandbytes")
    config = {
        "model_type": "qwen2",
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = StepSpec.from_kwargs(
        model=str(path), method="qlora", batch=2, seq=64, steps=3, grad_ckpt=grad_ckpt
    )
    meter = FakeMeter()
    fake = run_step(spec, meter)
    assert meter.replayed_layers == replayed_layers
    assert _numbers(fake) == _numbers(run_step(spec, HostMeter()))


def test_the_decoder_layers_are_the_longest_stack_of_one_class() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=8, intermediate_size=8, num_attention_heads=2, vocab_size=8)
        )
        assert repeated_layers(model) == list(model.model.layers)
        model.model.layers = model.model.layers[:3]  # too few to repeat: traced whole
        assert repeated_layers(model) == []


class _SelfChanging(Full):
    """Full training whose layers change themselves on each call, as bitsandbytes' Linear4bit
    casts its bias to the input's dtype (here: a buffer regrown): a replayed layer would not
    change."""

    name = "self-changing"

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        for layer in model.model.layers:  # type: ignore[union-attr]
            forward = layer.forward
            layer.register_buffer("calls", torch.zeros(1))

            def grow_then_run(*args: Any, _layer: Any = layer, _run: Any = forward, **kwargs: Any):
                if _layer.calls.numel() < 4096:
                    _layer.calls = torch.zeros(_layer.calls.numel() * 64)
                return _run(*args, **kwargs)

            layer.forward = grow_then_run
        return super().prepare(model, spec)


class _Keeping(Full):
    """Full training whose layers keep a tensor they made on their first call, as a lazily
    built cache would: the replayed layers would not make it."""

    name = "keeping"

    def prepare(self, model: torch.nn.Module, spec: StepSpec) -> torch.nn.Module:
        for layer in model.model.layers:  # type: ignore[union-attr]
            forward = layer.forward

            def keep_then_run(*args: Any, _layer: Any = layer, _run: Any = forward, **kwargs: Any):
                if not hasattr(_layer, "kept"):
                    _layer.kept = torch.zeros(4096)
                return _run(*args, **kwargs)

            layer.forward = keep_then_run
        return super().prepare(model, spec)


@pytest.fixture(params=[_SelfChanging, _Keeping])
def changing(request: pytest.FixtureRequest) -> Iterator[str]:
    saved = methods.snapshot()
    methods.register(request.param())
    yield request.param.name
    methods.restore(saved)


def test_layers_that_change_themselves_are_traced_while_they_do(changing: str) -> None:
    """Each layer's first call changes it (a replay of the first layer would leave the others
    as they were: bf16 weights, no kept tensor); once changed, the layers repeat."""
    spec = StepSpec(model="tiny-llama", method=changing, batch=1, seq=32, steps=3)
    fake = run_step(spec, FakeMeter())
    assert _numbers(fake) == _numbers(run_step(spec, HostMeter()))
