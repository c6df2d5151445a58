"""Memory-saving optimizers through their own libraries, measured on tiny-llama by the host meter.

Each case is full fine-tuning, bf16, one sequence of 32 tokens, two steps, in this process (well
under a second each). Where an optimizer's state has a definition (bitsandbytes' 8-bit rule,
Adafactor's factored moment, GaLore's low-rank moments and projectors, BAdam's one block) the
measured optimizer bytes are checked against it to the byte.
"""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from typing import Any

# Imported up front (badam below): their imports make small tensors that would otherwise land
# in whichever meter window imports them first (badam: 16 B, peft: 16 B).
import peft  # noqa: F401
import pytest
import torch

import pytest_vram
from pytest_vram import zoo
from pytest_vram.errors import SpecError, Unsupported
from pytest_vram.methods import METHODS, OPTIMIZERS, optim_extra
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec

for _library in ("bitsandbytes", "galore_torch", "badam", "lomo_optim"):
    pytest.importorskip(_library)  # optional: none of them is a pytest-vram dependency

BF16 = 2  # bytes
F32 = 4
RUNNABLE = ("adafactor", "adamw-8bit", "paged-adamw-8bit", "galore-adamw", "badam", "lomo")


def spec(optimizer: str, method: str = "full", **options: Any) -> StepSpec:
    return StepSpec(
        "tiny-llama", method, optimizer, batch=1, seq=32, optimizer_options=tuple(options.items())
    )


_RESULTS: dict[tuple[str, str], tuple[MemoryResult, list[str]]] = {}


def measured(optimizer: str, method: str = "full") -> MemoryResult:
    """One measurement per case for the whole module; its warnings are kept in ``warned``."""
    key = (optimizer, method)
    if key not in _RESULTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pytest_vram.measure(spec(optimizer, method))
        _RESULTS[key] = result, [str(w.message) for w in caught]
    return _RESULTS[key][0]


def warned(optimizer: str, method: str = "full") -> list[str]:
    measured(optimizer, method)
    return _RESULTS[optimizer, method][1]


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    model = zoo.build_model("tiny-llama", torch.bfloat16, "meta")
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def stepped(
    optimizer: str, method: str = "full", steps: int = 2, **options: Any
) -> tuple[Any, Any]:
    """(model, optimizer) after ``steps`` steps outside any meter; the last step's gradients
    are left in place, as the breakdown sees them."""
    s = spec(optimizer, method, **options)
    impl = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    model = METHODS[method].prepare(zoo.build_model("tiny-llama", torch.bfloat16, "cpu"), s)
    built = impl.build(model, s)
    for i in range(steps):
        if i:
            impl.zero_grad(built)
        ids = torch.randint(2048, (1, 32))
        impl.backward_step(built, model(input_ids=ids, labels=ids).loss, s)
    return model, built


def state_bytes(optimizer: str, built: Any) -> int:
    storages = {
        t.untyped_storage().data_ptr(): t for t in OPTIMIZERS[optimizer].state_tensors(built)
    }
    return sum(t.untyped_storage().nbytes() for t in storages.values())


@pytest.mark.parametrize("optimizer", RUNNABLE)
def test_steps_twice_and_the_breakdown_adds_up(optimizer: str) -> None:
    result = measured(optimizer)
    assert len(result.step_peak_bytes) == 2
    assert result.peak_bytes == max(result.step_peak_bytes) == result.breakdown.total_bytes
    assert result.breakdown.param_bytes == sum(math.prod(s) for _, s in shapes()) * BF16


def test_adamw_8bit_state_follows_the_bitsandbytes_rule() -> None:
    # >= min_8bit_size (4096) elements: uint8 exp_avg and exp_avg_sq, one fp32 absmax each per
    # block of 256; smaller tensors: two fp32 moments. Plus the two 256-entry fp32 qmaps.
    expected = 2 * 256 * F32
    for _, shape in shapes():
        n = math.prod(shape)
        expected += 2 * n + 2 * F32 * math.ceil(n / 256) if n >= 4096 else 2 * F32 * n
    assert measured("adamw-8bit").breakdown.optimizer_bytes == expected
    # About half of AdamW's two bf16 moments (4 bytes a param), less for bigger tensors.
    assert expected < measured("adamw").breakdown.optimizer_bytes * 0.55


def test_paged_adamw_8bit_falls_back_to_ordinary_tensors_on_cpu() -> None:
    paged, plain = measured("paged-adamw-8bit"), measured("adamw-8bit")
    assert any("Paged optimizers are not supported on CPU" in w for w in warned("paged-adamw-8bit"))
    assert (paged.peak_bytes, paged.breakdown) == (plain.peak_bytes, plain.breakdown)
    with pytest.warns(UserWarning, match="not supported on CPU"):
        _, built = stepped("paged-adamw-8bit", steps=1)
    assert not any(
        getattr(t, "is_paged", False) for t in OPTIMIZERS["paged-adamw-8bit"].state_tensors(built)
    )
    (note,) = optim_extra.PagedAdamW8bit().notes(built)
    assert "no state tensor is paged" in note
    assert optim_extra.AdamW8bit().notes(built) == ()


def test_adafactor_state_is_factored() -> None:
    # fp32 row and column vectors per 2-D param, a full fp32 vector per 1-D param, and the
    # param's RMS (a 0-d fp32 tensor) per param; no first moment with beta1 unset.
    expected = sum(F32 * (sum(s) if len(s) == 2 else s[0]) + F32 for _, s in shapes())
    result = measured("adafactor")
    assert result.breakdown.optimizer_bytes == expected
    assert expected * 100 < measured("adamw").breakdown.optimizer_bytes


def test_galore_state_is_low_rank_moments_and_projectors() -> None:
    # bf16, rank 16, proj_type std: an (m, n) weight's gradient is projected on its shorter
    # side, so its two moments are r x max(m, n) and its projector is r x min(m, n). The other
    # params (embeddings, head, norms) keep AdamW's two full moments.
    r = 16
    expected = 0
    for name, s in shapes():
        if len(s) == 2 and ".layers." in name:
            expected += BF16 * (2 * r * max(s) + r * min(s))
        else:
            expected += BF16 * 2 * math.prod(s)
    result = measured("galore-adamw")
    assert result.breakdown.optimizer_bytes == expected
    assert expected < measured("adamw").breakdown.optimizer_bytes / 2
    # The projectors are found by the default walk (they sit on GaLoreProjector objects).
    _, built = stepped("galore-adamw")
    found = {id(t) for t in OPTIMIZERS["galore-adamw"].state_tensors(built)}
    projectors = [st["projector"].ortho_matrix for st in built.state.values() if "projector" in st]
    assert len(projectors) == 7 * 4 and all(id(m) in found for m in projectors)
    assert state_bytes("galore-adamw", built) == expected


def test_badam_keeps_state_for_one_decoder_layer_only() -> None:
    model, built = stepped("badam")
    layers = [n for n, _ in model.named_modules() if n.count(".") == 2 and ".layers." in n]
    assert built.block_prefix_list == [[f"{n}."] for n in layers] and len(layers) == 4
    block = [p for n, p in model.named_parameters() if n.startswith(f"{layers[0]}.")]
    # ascending: layer 0 first
    assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in block]
    n_block = sum(p.numel() for p in block)
    # fp32 copy of each block param plus AdamW's two fp32 moments on it, and a 0-d step each.
    expected = 3 * F32 * n_block + F32 * len(block)
    assert state_bytes("badam", built) == expected
    result = measured("badam")
    assert result.trainable_params == n_block
    assert result.breakdown.optimizer_bytes == expected
    # BlockOptimizer.step frees the gradients (bf16 -> fp32 copies -> None) before it returns.
    assert result.breakdown.grad_bytes == 0
    (note,) = optim_extra.BAdam().notes(built)
    assert "gradients" in note
    # A block switch after every step drops the state the step's peak held.
    _, switched = stepped("badam", switch_block_every=1)
    assert not switched.base_optimizer.state
    assert "block switch" in optim_extra.BAdam().notes(switched)[-1]


def test_badam_runs_lora_params_of_one_block() -> None:
    result = measured("badam", "lora")
    lora = measured("adamw", "lora")
    assert result.trainable_params * 4 == lora.trainable_params  # one of four layers
    assert result.peak_bytes == result.breakdown.total_bytes


def test_lomo_holds_one_gradient_at_a_time_and_no_state() -> None:
    """LOMO's hook updates and drops each gradient when the next one arrives: what the peak
    holds of gradients is at most one of them (counted as a gradient though it is gone by
    step_end), and never optimizer state."""
    model, _ = stepped("lomo", steps=1)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    result = measured("lomo")
    assert 0 < result.breakdown.grad_bytes <= largest
    assert result.breakdown.optimizer_bytes == 0
    sgd = measured("sgd")  # the same update with the gradients kept
    assert result.peak_bytes < sgd.peak_bytes
    assert result.peak_bytes < result.breakdown.param_bytes + sgd.breakdown.grad_bytes


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_lomo_updates_only_what_the_method_trains(method: str) -> None:
    model, _ = stepped("lomo", method, steps=1)
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(0)  # the same start as stepped()
    base = zoo.build_model("tiny-llama", torch.bfloat16, "cpu")
    start = METHODS[method].prepare(base, spec("lomo", method))
    changed = {
        p.requires_grad
        for p, q in zip(model.parameters(), start.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    assert changed == {True}  # some trainable params moved, no frozen one did
    result = measured("lomo", method)
    trained = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    assert result.breakdown.grad_bytes <= max(trained)  # at most one gradient at a time
    assert result.breakdown.optimizer_bytes == 0


@pytest.mark.parametrize(
    ("optimizer", "call"),
    [
        ("galore-adamw-8bit", "GaLoreAdamW8bit.step calls torch.cuda.synchronize()"),
        ("adalomo", "AdaLomo.__init__ allocates its state with .cuda()"),
    ],
)
def test_cuda_only_optimizers_are_unsupported_on_cpu(optimizer: str, call: str) -> None:
    with pytest.raises(Unsupported, match=re.escape(call)):
        pytest_vram.measure(spec(optimizer))


def test_a_missing_library_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "badam" else find_spec(m, *a)
    )
    reason = OPTIMIZERS["badam"].unsupported(spec("badam"), "cpu")
    assert reason == "badam needs badam, which is not installed: pip install badam"
    assert OPTIMIZERS["lomo"].unsupported(spec("lomo"), "cpu") is None


def test_adalomo_state_with_cuda_stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the library's .cuda() is neutralised, to check the build and the state walk here.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    model, built = stepped("adalomo")
    assert all(p.grad is None for p in model.parameters())
    expected = sum(F32 * (sum(s) if len(s) == 2 else s[0]) for _, s in shapes())
    assert state_bytes("adalomo", built) == expected


def test_galore_adamw_8bit_state_with_cuda_sync_stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    _, built = stepped("galore-adamw-8bit")
    tensors = list(OPTIMIZERS["galore-adamw-8bit"].state_tensors(built))
    projectors = [st["projector"].ortho_matrix for st in built.state.values() if "projector" in st]
    assert len(projectors) == 28 and all(any(m is t for t in tensors) for m in projectors)
    assert any(t.dtype == torch.uint8 for t in tensors)


@pytest.mark.parametrize(
    ("method", "optimizer", "options", "words"),
    [
        ("lora", "galore-adamw", {}, "already low-rank LoRA matrices"),
        ("lora", "galore-adamw-8bit", {}, "already low-rank LoRA matrices"),
        ("freeze", "badam", {}, "would override what freeze trains"),
        ("full", "badam", {"switch_mode": "fixed"}, "needs start_block"),
        ("full", "badam", {"switch_mode": "sideways"}, "must be one of"),
        ("full", "adafactor", {"warmup_init": True}, "needs relative_step=True"),
    ],
)
def test_incompatible_combinations_name_both(
    method: str, optimizer: str, options: dict[str, Any], words: str
) -> None:
    with pytest.raises(SpecError, match=f"^{method} with {optimizer}: .*{words}"):
        spec(optimizer, method, **options)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_zero_state_is_what_the_torch_optimizer_keeps(optimizer: str) -> None:
    """The simulated ZeRO layout's state per parameter is the library's own: DeepSpeed steps
    the torch optimizer on its fp32 partition, where AdamW keeps two fp32 moments (and a
    step counter per tensor) and momentum-free SGD nothing."""
    impl = OPTIMIZERS[optimizer]
    assert impl.zero_state is not None
    partition = torch.nn.Linear(1000, 1, bias=False)  # fp32, as DeepSpeed's master copy
    built = impl.build(partition, spec(optimizer))
    partition.weight.grad = torch.ones_like(partition.weight)
    built.step()
    state = built.state[partition.weight]
    moments = sum(
        t.numel() * t.element_size()
        for k, t in state.items()
        if k != "step" and isinstance(t, torch.Tensor)
    )
    assert moments == impl.zero_state.moment_bytes_per_param * 1000
