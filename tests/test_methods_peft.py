"""peft methods and quantized LoRA on tiny-llama: each takes two steps on the host meter, and the
breakdown agrees with what the libraries hold (trainable counts, AdamW state, packed weights).

Steps run in this process (``pytest_vram.measure``); each method is measured once per module and
built once more, outside the meter, to inspect the model run_step steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# Imported up front, as the worker preloads it: its import makes tensors that would otherwise
# land in the first measured window.
import peft  # noqa: F401
import pytest
import torch

import pytest_vram
from pytest_vram import methods
from pytest_vram.errors import SpecError
from pytest_vram.methods import OptionValue
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.step import _checkpointing_enable

LORA_LIKE = ("lora", "dora", "pissa", "rslora", "lora+")
PROMPT_LEARNING = ("prefix", "p-tuning", "prompt")
QUANTIZED = ("qlora", "lora-8bit")
ALL = (*LORA_LIKE, "ia3", "vera", *PROMPT_LEARNING, *QUANTIZED)
F32 = 4  # bytes
SEQ = 32
VIRTUAL_TOKENS = 20  # the prompt-learning methods' default num_virtual_tokens

Get = Callable[[str], Any]

# peft hands prefix tuning's cache to the model as `past_key_values`, which transformers renamed.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def spec(method: str, **kwargs: Any) -> StepSpec:
    return StepSpec(model="tiny-llama", batch=1, seq=SEQ, method=method, **kwargs)


@pytest.fixture(scope="module")
def measured() -> Callable[[str], MemoryResult]:
    cache: dict[str, MemoryResult] = {}

    def get(method: str) -> MemoryResult:
        if method not in cache:
            cache[method] = pytest_vram.measure(spec(method))
        return cache[method]

    return get


@pytest.fixture(scope="module")
def prepared() -> Get:
    """The model run_step would step for a method, built the same way but outside the meter."""
    cache: dict[str, torch.nn.Module] = {}

    def get(method: str) -> torch.nn.Module:
        if method not in cache:
            impl = methods.METHODS[method]
            model = impl.build_model(spec(method), torch.bfloat16, "cpu")
            model.config.use_cache = False  # type: ignore[union-attr]
            cache[method] = impl.prepare(model, spec(method))
        return cache[method]

    return get


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ALL)
def test_two_steps_breakdown_and_adamw_state(
    method: str, measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    r = measured(method)
    b = r.breakdown
    assert len(r.step_peak_bytes) == 2
    assert r.peak_bytes == max(r.step_peak_bytes) == b.total_bytes
    assert min(b.param_bytes, b.optimizer_bytes, b.activation_bytes) > 0

    model = prepared(method)
    params = trainable(model)
    peft_count = model.get_nb_trainable_parameters()[0]  # the same model as run_step's
    assert r.trainable_params == peft_count == sum(p.numel() for p in params)
    # peft keeps every adapter (and prompt encoder) in fp32 on a bf16 base, so AdamW holds
    # exp_avg + exp_avg_sq (8 B per element) and a 4 B fp32 `step` scalar per tensor.
    assert {p.dtype for p in params} == {torch.float32}
    assert b.optimizer_bytes == 8 * r.trainable_params + F32 * len(params)
    # Step 2 peaks in forward/backward with AdamW's state beside it. So does step 1, without
    # it, for every method but p-tuning: its prompt encoder's state is large beside its
    # activations, and step 1 peaks in the foreach step, which holds exp_avg_sq.sqrt() of every
    # trainable parameter as the state is first made.
    step1, step2 = r.step_peak_bytes
    if method == "p-tuning":
        assert 0 < step2 - step1 < b.optimizer_bytes
    else:
        assert step2 - step1 == b.optimizer_bytes


def test_dora_adds_magnitude_vectors_and_activations(
    measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    lora, dora = measured("lora"), measured("dora")
    magnitudes = [p for n, p in prepared("dora").named_parameters() if "lora_magnitude" in n]
    # One magnitude per output row of each adapted Linear: 4 layers x 2400 rows.
    assert sum(p.numel() for p in magnitudes) == 9600
    assert dora.trainable_params - lora.trainable_params == 9600
    # DoRA also computes the norm of the adapted weight (W + BA) per layer, inside autograd.
    assert dora.breakdown.activation_bytes > lora.breakdown.activation_bytes


def test_lora_variants_change_init_or_scale_not_tensors(
    measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    lora = measured("lora")
    for name in ("pissa", "rslora", "lora+"):
        assert measured(name).breakdown == lora.breakdown, name

    def q_proj(method: str) -> Any:
        return prepared(method).base_model.model.model.layers[0].self_attn.q_proj

    assert q_proj("lora").scaling["default"] == 16 / 8  # alpha / rank
    assert q_proj("rslora").scaling["default"] == pytest.approx(16 / math.sqrt(8))
    # LoRA starts with B = 0; PiSSA's B holds the top singular vectors of the base weight.
    assert not q_proj("lora").lora_B["default"].weight.any()
    assert q_proj("pissa").lora_B["default"].weight.abs().sum() > 0


def test_loraplus_groups_b_matrices_at_lr_times_ratio(prepared: Get) -> None:
    model = prepared("lora+")
    impl = methods.METHODS["lora+"]
    names = {id(p): n for n, p in model.named_parameters()}
    adamw = impl.build_optimizer(model, spec("lora+"), methods.OPTIMIZERS["adamw"])
    assert type(adamw) is torch.optim.AdamW
    lr_of = {names[id(p)]: g["lr"] for g in adamw.param_groups for p in g["params"]}
    assert len(lr_of) == len(trainable(model)) == 4 * 7 * 2  # A and B of every Linear
    for name, lr in lr_of.items():
        assert lr == (1e-4 * 16 if ".lora_B." in name else 1e-4), name

    sgd_spec = spec("lora+", optimizer="sgd", optimizer_options={"momentum": 0.9})
    sgd = impl.build_optimizer(model, sgd_spec, methods.OPTIMIZERS["sgd"])
    assert type(sgd) is torch.optim.SGD
    assert {(g["lr"], g["momentum"]) for g in sgd.param_groups if g["params"]} == {
        (1e-3, 0.9),
        (1e-3 * 16, 0.9),
    }


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_trains_from_input_ids_and_labels(method: str, prepared: Get) -> None:
    model = prepared(method)
    ids = torch.randint(2048, (1, SEQ))
    out = model(input_ids=ids, labels=ids)
    # Prompt and p-tuning prepend virtual tokens (peft pads the labels with -100 to match);
    # prefix tuning passes them as a key/value cache instead.
    virtual = 0 if method == "prefix" else VIRTUAL_TOKENS
    assert out.logits.shape[1] == SEQ + virtual
    out.loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in trainable(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_ia3_targets_the_language_model_of_a_vision_language_model() -> None:
    # peft has no IA3 defaults for qwen2_vl; llama's names match only its language layers.
    from pytest_vram import zoo

    vl = StepSpec(model="tiny-qwen2-vl", method="ia3", seq=SEQ)
    base = zoo.build_model("tiny-qwen2-vl", torch.bfloat16, "meta")  # shapes only, no memory
    names = [n for n, p in methods.METHODS["ia3"].prepare(base, vl).named_parameters()]
    adapted = [n for n in names if ".ia3_l." in n]
    assert len(adapted) == 2 * 3 and all(".language_model.layers." in n for n in adapted)


def test_prefix_tuning_with_checkpointing_is_refused() -> None:
    with pytest.raises(SpecError, match=r"prefix with adamw: .*grad_ckpt"):
        spec("prefix", grad_ckpt=True)
    # The reason is peft's own: its prompt encoder setup rejects a checkpointed base model.
    base = methods.METHODS["prefix"].build_model(spec("prefix"), torch.bfloat16, "cpu")
    _checkpointing_enable(base)
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        methods.METHODS["prefix"].prepare(base, spec("prefix"))


@pytest.mark.parametrize(
    ("method", "option"), [("pissa", "niter"), ("prompt", "num_virtual_tokens"), ("vera", "rank")]
)
def test_option_ranges_are_checked_when_the_spec_is_made(method: str, option: str) -> None:
    with pytest.raises(SpecError, match=f"{option}=-1 must be >="):
        spec(method, method_options={option: -1})


def test_loraplus_refuses_optimizers_it_cannot_group(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(methods.Optimizer):
        name = "other-opt"
        options: dict[str, OptionValue] = {}

        def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
            raise AssertionError("never built")

    monkeypatch.setitem(methods.OPTIMIZERS, "other-opt", Other())
    with pytest.raises(SpecError) as info:
        spec("lora+", optimizer="other-opt")
    assert "lora+" in str(info.value) and "'other-opt'" in str(info.value)
    spec("lora+", optimizer="sgd")  # both torch optimizers peft can group are accepted


# tiny-llama: 4 decoder layers of 7 Linears, whose output rows add up to 2400 per layer
# (q 256, k 128, v 128, o 256, gate 688, up 688, down 256); the widest Linear is 688.
LAYERS, LINEARS, OUT_ROWS, WIDEST = 4, 7, 2400, 688


def test_vera_trains_two_vectors_per_layer_far_fewer_than_lora(
    measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    model = prepared("vera")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.split(".")[-2] for n in trained}  # ...q_proj.vera_lambda_b.default
    assert kinds == {"vera_lambda_b", "vera_lambda_d"}
    rank = 256  # peft's default r
    assert sum(p.numel() for p in trained.values()) == LAYERS * (OUT_ROWS + LINEARS * rank)
    vera, lora = measured("vera"), measured("lora")
    assert vera.trainable_params == 16_768
    assert vera.trainable_params * 8 < lora.trainable_params  # rank 8 LoRA: 147,968
    assert vera.breakdown.optimizer_bytes * 8 < lora.breakdown.optimizer_bytes


def test_vera_projections_are_one_frozen_pair_shared_by_every_layer(
    measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    model = prepared("vera")
    shared = {}
    for name, buffer in model.named_buffers():
        if ".vera_A." in name or ".vera_B." in name:
            shared.setdefault(name.split(".")[-2], set()).add(buffer.untyped_storage().data_ptr())
    assert {k: len(v) for k, v in shared.items()} == {"vera_A": 1, "vera_B": 1}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    rank = 256
    assert tuple(q_proj.vera_A["default"].shape) == (rank, WIDEST)  # sliced per layer
    assert tuple(q_proj.vera_B["default"].shape) == (WIDEST, rank)
    # The meter counts the pair once (fp32 buffers), beside the base model's own buffers.
    extra = measured("vera").breakdown.buffer_bytes - measured("lora").breakdown.buffer_bytes
    assert extra == 2 * rank * WIDEST * F32


def test_vera_gradients_reach_only_its_vectors(prepared: Get) -> None:
    model = prepared("vera")
    ids = torch.randint(2048, (1, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    # peft starts lambda_b at 0 (the adapted layer begins as the base), so only it moves first.
    assert all(g.any() for n, g in grads.items() if ".vera_lambda_b." in n)
    model.zero_grad(set_to_none=True)


def test_vera_rank_sizes_its_vectors_and_projections() -> None:
    small = spec("vera", method_options={"rank": 16})
    impl = methods.METHODS["vera"]
    model = impl.prepare(impl.build_model(small, torch.bfloat16, "cpu"), small)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.vera_lambda_d["default"].numel() == 16
    assert tuple(q_proj.vera_A["default"].shape) == (16, WIDEST)
    assert model.get_nb_trainable_parameters()[0] == LAYERS * (OUT_ROWS + LINEARS * 16)


def test_vera_traces_on_the_fake_meter_byte_for_byte(
    measured: Callable[[str], MemoryResult],
) -> None:
    """What ``Vera.fake_meter_blocker = None`` claims."""
    from pytest_vram.meters.fake import FakeMeter
    from pytest_vram.step import run_step

    host, fake = measured("vera"), run_step(spec("vera"), FakeMeter())
    assert (fake.peak_bytes, fake.breakdown) == (host.peak_bytes, host.breakdown)


def _base_bytes(model: torch.nn.Module, quantized: type) -> tuple[int, int]:
    """(bytes of parameters outside ``quantized`` layers' weights, bytes of buffers)."""
    packed = {id(m.weight) for m in model.modules() if isinstance(m, quantized)}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in packed)
    return other, sum(b.numel() * b.element_size() for b in model.buffers())


def _no_weight_in_state(method: str, model: torch.nn.Module) -> None:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = list(methods.METHODS[method].state_tensors(model))
    assert state and not {t.untyped_storage().data_ptr() for t in state} & params


def test_qlora_nf4_double_quant_storage(
    measured: Callable[[str], MemoryResult], prepared: Get
) -> None:
    from bitsandbytes.nn.modules import Linear4bit

    model = prepared("qlora")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 4 * 7  # every decoder Linear; lm_head stays unquantized
    sizes = [m.in_features * m.out_features for m in layers]
    for m, n in zip(layers, sizes, strict=True):
        assert m.weight.dtype == torch.uint8 and m.weight.numel() == n // 2  # two 4-bit codes
    _no_weight_in_state("qlora", model)

    r = measured("qlora")
    other, buffers = _base_bytes(model, Linear4bit)
    packed = r.breakdown.param_bytes - other
    state = r.breakdown.buffer_bytes - buffers
    assert packed == sum(sizes) // 2

    # NF4 + double quant per Linear of n weights: n/2 B packed, one uint8 absmax per 64-weight
    # block, one fp32 absmax per 256 of those; then constants per Linear: the offset of the
    # nested absmax (4 B), the 16-entry NF4 code and 256-entry blockwise code (fp32 each).
    constants = 4 + 16 * F32 + 256 * F32
    blocks = [math.ceil(n / 64) for n in sizes]
    assert state == sum(k + F32 * math.ceil(k / 256) + constants for k in blocks)

    # Asymptotically 4 + 8/64 + 32/(64*256) = 4.127 bits per weight. tiny-llama's Linears hold
    # only 33k-176k weights, so the 1092 B of constants per Linear add 0.084 bits here (0.0002
    # on a 7B model); without them only the rounding of partial 256-block groups is left.
    n = sum(sizes)
    bits = 8 * (packed + state) / n
    overhead = 8 * constants * len(sizes) / n
    assert bits == pytest.approx(4.211, abs=0.001)
    assert bits - overhead == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.0005)


def test_lora_8bit_storage(measured: Callable[[str], MemoryResult], prepared: Get) -> None:
    from bitsandbytes.nn.modules import Linear8bitLt

    model = prepared("lora-8bit")
    layers = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    assert len(layers) == 4 * 7
    for m in layers:
        assert m.weight.dtype == torch.int8 and m.weight.numel() == m.in_features * m.out_features
    _no_weight_in_state("lora-8bit", model)

    r = measured("lora-8bit")
    other, buffers = _base_bytes(model, Linear8bitLt)
    assert r.breakdown.param_bytes - other == sum(m.weight.numel() for m in layers)
    # LLM.int8() keeps one fp32 scale (SCB) per output row.
    assert r.breakdown.buffer_bytes - buffers == F32 * sum(m.out_features for m in layers)


def test_quantized_base_holds_fewer_parameter_bytes(
    measured: Callable[[str], MemoryResult],
) -> None:
    # peft's prepare_model_for_kbit_training upcasts the unquantized embeddings, norms and
    # lm_head to fp32, which on tiny-llama is most of what quantization saves.
    qlora, int8, lora = (measured(m).breakdown.param_bytes for m in ("qlora", "lora-8bit", "lora"))
    assert qlora < int8 < lora
    # The bf16 source model that was saved and reloaded is gone before the steps (it alone
    # would add 7.9 MB of "activations" and lift qlora's peak above lora's).
    assert measured("qlora").peak_bytes < measured("lora").peak_bytes


def test_every_method_is_registered_once() -> None:
    assert set(ALL) <= set(methods.METHODS)
