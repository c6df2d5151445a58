"""HostMeter: exact byte counts, the same in every fresh worker child, equal to torch's MemTracker.

All runs use tiny-llama (39 parameter tensors, 3,950,848 parameters), so whole steps take well
under a second once warm; the worker children pay a few seconds of cold start each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

# Imported up front, as the worker preloads it: its import makes two torch.tensor(1) defaults
# (16 B) that would otherwise land in whichever meter window imports it first.
import peft
import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from traces import events

import pytest_vram
from pytest_vram import methods, zoo
from pytest_vram.meters.base import Roles
from pytest_vram.meters.host import HostMeter
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.step import run_step
from pytest_vram.user_step import measure_fn
from pytest_vram.worker import Job, Worker

F32 = 4  # bytes
BF16 = 2
FP32_FULL = StepSpec("tiny-llama", "full", "adamw", precision="fp32", batch=2, seq=64)
LORA_BF16 = dataclasses.replace(FP32_FULL, method="lora", precision="bf16")

Model = torch.nn.Module
Optim = torch.optim.Optimizer


def _shape() -> tuple[int, int]:
    """(parameter tensors, buffer bytes) of tiny-llama, read off a meta-device copy for free."""
    model = zoo.build_model("tiny-llama", torch.float32, "meta")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return len(list(model.parameters())), buffers


@pytest.fixture(scope="module")
def fp32_full() -> MemoryResult:
    return run_step(FP32_FULL, HostMeter())


@pytest.fixture(scope="module")
def lora_runs() -> list[MemoryResult]:
    # Each run is a fresh fork of the preloaded forkserver: the determinism the plugin relies on.
    # (In one process a second run can differ by a few bytes: the first pays for lazy imports
    # that create tensors inside its window, e.g. peft's 16 B of torch.tensor(1) defaults.)
    worker = Worker()
    results: list[MemoryResult] = []
    for _ in range(3):
        result = worker.run(Job("host", spec=LORA_BF16), timeout_s=300)
        if not isinstance(result, MemoryResult):
            pytest.fail(result.long_repr())
        results.append(result)
    return results


def test_fresh_children_measure_identically(lora_runs: list[MemoryResult]) -> None:
    first = lora_runs[0]
    for other in lora_runs[1:]:
        assert other.peak_bytes == first.peak_bytes
        assert other.step_peak_bytes == first.step_peak_bytes
        assert other.breakdown == first.breakdown
    assert first.peak_bytes == max(first.step_peak_bytes) == first.breakdown.total_bytes
    # LoRA peaks in forward/backward, before optimizer.step(): step 1's window has no AdamW
    # state yet, step 2's starts with it, and nothing else differs between the two peaks.
    step1, step2 = first.step_peak_bytes
    assert step2 - step1 == first.breakdown.optimizer_bytes > 0


def test_fp32_full_adamw_arithmetic(fp32_full: MemoryResult) -> None:
    b = fp32_full.breakdown
    n_tensors, buffer_bytes = _shape()
    assert fp32_full.trainable_params == fp32_full.total_params == 3_950_848
    assert b.param_bytes == F32 * fp32_full.total_params
    # torch AdamW keeps exp_avg and exp_avg_sq shaped like each param, plus a 0-d float32
    # `step` per param: 2 * 15,803,392 + 4 * 39 = 31,606,940 bytes.
    assert b.optimizer_bytes == 2 * b.param_bytes + F32 * n_tensors
    # The peak is inside optimizer.step(), when backward has filled every .grad.
    assert b.grad_bytes == b.param_bytes
    assert b.buffer_bytes == buffer_bytes == 256  # rotary inv_freq + original_inv_freq
    assert b.total_bytes == fp32_full.peak_bytes
    # From step 1 on the state exists at the peak, so both windows peak alike.
    assert fp32_full.step_peak_bytes == (fp32_full.peak_bytes,) * 2


def test_bf16_halves_param_bytes(fp32_full: MemoryResult) -> None:
    bf16 = run_step(dataclasses.replace(FP32_FULL, precision="bf16"), HostMeter())
    n_tensors, _ = _shape()
    assert bf16.total_params == fp32_full.total_params
    assert 2 * bf16.breakdown.param_bytes == fp32_full.breakdown.param_bytes
    assert bf16.breakdown.param_bytes == BF16 * bf16.total_params
    assert bf16.breakdown.grad_bytes == bf16.breakdown.param_bytes
    # AdamW state follows the param dtype; only the float32 `step` scalars do not halve.
    assert bf16.breakdown.optimizer_bytes == 2 * bf16.breakdown.param_bytes + F32 * n_tensors


def test_sgd_state_only_with_momentum() -> None:
    plain = run_step(dataclasses.replace(FP32_FULL, optimizer="sgd"), HostMeter())
    assert plain.breakdown.optimizer_bytes == 0
    # Control: the same role picks up SGD's one momentum buffer per param when there is one.
    heavy = run_step(
        dataclasses.replace(FP32_FULL, optimizer="sgd", optimizer_options=(("momentum", 0.9),)),
        HostMeter(),
    )
    assert heavy.breakdown.optimizer_bytes == heavy.breakdown.param_bytes > 0


def test_lora_param_counts_match_peft(lora_runs: list[MemoryResult]) -> None:
    base = zoo.build_model("tiny-llama", torch.bfloat16)
    model = methods.METHODS["lora"].prepare(base, LORA_BF16)
    assert isinstance(model, peft.PeftModel)
    trainable, total = model.get_nb_trainable_parameters()
    result = lora_runs[0]
    assert (result.trainable_params, result.total_params) == (trainable, total)
    assert 0 < trainable < total
    # peft keeps the adapters in fp32 on the bf16 base model.
    assert result.breakdown.param_bytes == BF16 * (total - trainable) + F32 * trainable


# --- against torch.distributed._tools.mem_tracker.MemTracker ----------------------------------
# MemTracker counts CPU storages by the same byte rule (nbytes, no rounding off CUDA) but only
# sees op outputs plus what track_external() registers. It cannot track frozen parameters (it
# registers grad hooks on every param), so only full fine-tuning is compared.


def _build() -> tuple[Model, Optim]:
    """What run_step builds for FP32_FULL."""
    torch.manual_seed(FP32_FULL.seed)
    base = zoo.build_model("tiny-llama", torch.float32)
    model = methods.METHODS["full"].prepare(base, FP32_FULL)
    model.train()
    return model, methods.OPTIMIZERS["adamw"].build(model, FP32_FULL)


def _train(
    model: Model, optimizer: Optim, between: Callable[[], None] | None = None, mark: bool = False
) -> tuple[Model, Optim]:
    """run_step's loop: same inputs, same order (zero_grad after the step)."""
    gen = torch.Generator().manual_seed(FP32_FULL.seed)
    for _ in range(FP32_FULL.steps):
        ids = torch.randint(2048, (FP32_FULL.batch, FP32_FULL.seq), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if mark:
            pytest_vram.mark_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        del loss, ids
        if between is not None:
            between()  # MemTracker refuses a second forward without reset_mod_stats()
    return model, optimizer


def _peak_by_category(mt: MemTracker) -> dict[str, int]:
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {getattr(key, "name", str(key)): nbytes for key, nbytes in snap.items()}


def test_matches_memtracker_on_run_step(fp32_full: MemoryResult) -> None:
    mt = MemTracker()
    with mt:  # everything built inside, as run_step does
        _train(*_build(), between=mt.reset_mod_stats)
    theirs = _peak_by_category(mt)
    b = fp32_full.breakdown
    assert theirs["Total"] == fp32_full.peak_bytes == 79_018_400
    assert theirs["PARAM"] == b.param_bytes
    assert theirs["BUFFER"] == b.buffer_bytes
    assert theirs["GRAD"] == b.grad_bytes
    # MemTracker files every tensor made inside optimizer.step() as OPT, temporaries included;
    # we count only optimizer.state. At the peak AdamW's foreach step holds exp_avg_sq.sqrt()
    # of every parameter at once (the for-loop held lm_head's sqrt and quotient, 4 MiB).
    assert theirs["OPT"] - b.optimizer_bytes == F32 * fp32_full.trainable_params
    # Its ACT is the int64 input ids and the 0-d loss; we file those and the temporaries above
    # as activations and temporaries.
    assert theirs["ACT"] + theirs["TEMP"] == 2 * 64 * 8 + F32
    assert theirs["OPT"] + theirs["ACT"] + theirs["TEMP"] == b.optimizer_bytes + b.activation_bytes


@pytest.fixture(scope="module")
def built_outside() -> tuple[dict[str, int], MemoryResult, int]:
    """MemTracker as its docstring has it (track_external) and measure_fn on a fresh twin."""
    model, optimizer = _build()
    unread = model.get_buffer("model.rotary_emb.original_inv_freq").untyped_storage().nbytes()
    mt = MemTracker()
    mt.track_external(model, optimizer)
    with mt:
        _train(model, optimizer, between=mt.reset_mod_stats)
    ours = measure_fn(_train, _build(), {}, HostMeter())
    return _peak_by_category(mt), ours, unread


def test_matches_memtracker_on_model_built_outside(
    built_outside: tuple[dict[str, int], MemoryResult, int],
) -> None:
    theirs, ours, unread = built_outside
    # A tensor made outside the meter counts once an op reads it. original_inv_freq (32 floats)
    # is a buffer no op ever reads, so only track_external() sees it; every parameter is read.
    assert unread == 128
    assert theirs["Total"] - ours.peak_bytes == unread
    assert theirs["BUFFER"] - ours.breakdown.buffer_bytes == unread
    assert ours.breakdown.param_bytes == theirs["PARAM"] == F32 * ours.total_params
    assert ours.breakdown.optimizer_bytes == 2 * ours.breakdown.param_bytes + F32 * _shape()[0]


def test_measure_fn_unmarked_files_freed_grads_as_activations(
    built_outside: tuple[dict[str, int], MemoryResult, int],
) -> None:
    # Without mark_step the roles are read when fn returns, after zero_grad freed the grads:
    # the peak is right, its split is not. This is the documented limit mark_step lifts.
    theirs, ours, unread = built_outside
    assert ours.breakdown.grad_bytes == 0 < theirs["GRAD"]
    assert ours.peak_bytes == theirs["Total"] - unread


def test_mark_step_attributes_grads_live_at_peak(
    built_outside: tuple[dict[str, int], MemoryResult, int],
) -> None:
    theirs, _, _ = built_outside
    marked = measure_fn(_train, _build(), {"between": None, "mark": True}, HostMeter())
    assert marked.breakdown.grad_bytes == theirs["GRAD"] == marked.breakdown.param_bytes
    # mark_step hands the model's buffers to the meter, so the never-read original_inv_freq is
    # known from step 2 on and the total is MemTracker's to the byte.
    assert marked.peak_bytes == theirs["Total"]
    assert len(marked.step_peak_bytes) == FP32_FULL.steps  # one window per marked step


# --- StorageLedger edge cases ------------------------------------------------------------------


def test_tensor_made_outside_any_op_counts_once_used() -> None:
    early = torch.from_numpy(np.ones(1000, dtype=np.float32))  # before the meter: unseen
    meter = HostMeter()
    with meter:
        meter.step_begin()
        # frombuffer reaches no aten op (from_numpy would: under a dispatch mode it is lift_fresh).
        raw = torch.frombuffer(bytearray(4000), dtype=torch.float32)
        assert meter.ledger.live_bytes == 0
        out = early + raw  # both are inputs now; the sum is 4000 B more
        assert meter.ledger.live_bytes == 12_000
        measure = meter.step_end(Roles(params=[early], buffers=[raw], grads=[], optimizer=[]))
    assert measure.peak_bytes == 12_000
    assert (measure.breakdown.param_bytes, measure.breakdown.buffer_bytes) == (4000, 4000)
    assert measure.breakdown.activation_bytes == out.untyped_storage().nbytes() == 4000


def test_resized_storage_counts_at_its_new_size() -> None:
    orig_resize = torch.UntypedStorage.resize_
    meter = HostMeter()
    with meter:
        meter.step_begin()
        t = torch.zeros(256)  # 1 KiB
        storage = t.untyped_storage()
        storage.resize_(4096)  # not a dispatched op: HostMeter patches UntypedStorage.resize_
        assert meter.ledger.live_bytes == meter.ledger.peak_bytes == 4096
        storage.resize_(0)  # freeing by resize, as FSDP does with its flat parameters
        assert meter.ledger.live_bytes == 0
        t.resize_(100)  # Tensor.resize_ is an aten op; its output shows the new size
        assert meter.ledger.live_bytes == 400
        measure = meter.step_end(Roles(params=[], buffers=[], grads=[], optimizer=[t]))
    # The peak set was copied before the shrink, so the role gets the size it had at the peak.
    assert measure.peak_bytes == measure.breakdown.optimizer_bytes == 4096
    assert measure.breakdown.activation_bytes == 0
    assert torch.UntypedStorage.resize_ is orig_resize  # restored on exit


def test_meta_tensors_hold_no_memory() -> None:
    # DeepSpeed ZeRO-1/2 keep meta-device placeholders beside the real partitions.
    meter = HostMeter()
    with meter:
        meter.step_begin()
        placeholder = torch.empty(4096, device="meta")
        real = torch.empty(256)
        _ = placeholder * 2  # ops on meta tensors are watched too, and still count nothing
        measure = meter.step_end(
            Roles(params=[placeholder, real], buffers=[], grads=[], optimizer=[])
        )
    assert measure.peak_bytes == measure.breakdown.param_bytes == 256 * 4


def test_eager_attention_keeps_the_scores_sdpa_does_not() -> None:
    """Eager attention saves, per layer, the fp32 softmax of the b x heads x s x s scores and
    its cast to the weights' dtype for the backward: 6 bytes per score in bf16 ("LOMO Table 1"
    in ``suites/test_references.py`` checks the same at LLaMA-7B size)."""
    from pytest_vram.meters.host import HostMeter
    from pytest_vram.step import run_step
    from pytest_vram.zoo import build_config

    config = build_config("tiny-llama")
    base = {"model": "tiny-llama", "optimizer": "lomo", "batch": 2, "seq": 256}
    eager = run_step(StepSpec(**base, attention="eager"), HostMeter())
    sdpa = run_step(StepSpec(**base), HostMeter())
    layer_scores = 2 * config.num_attention_heads * 256 * 256
    scores = config.num_hidden_layers * layer_scores
    extra = eager.breakdown.activation_bytes - sdpa.breakdown.activation_bytes
    # ... and at the peak, a temporary copy of one layer's scores (at 7B: within 1%).
    assert 6 * scores <= extra < 6 * scores + 4 * layer_scores


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "full"},
        {"method": "lora", "grad_ckpt": True, "stage": "dpo"},
        {"method": "full", "precision": "fp16", "attention": "eager"},
        {"method": "lora", "precision": "amp-bf16"},
    ],
    ids=lambda fields: "-".join(str(v) for v in fields.values()),
)
def test_half_precision_matmuls_through_fp32_count_the_same_bytes(
    fields: dict[str, object],
) -> None:
    """The host meter runs bf16 and fp16 matmuls through torch's fp32 kernel (``meters.watch``):
    every allocation and free, the peaks and the breakdown are those of torch's own kernels."""
    spec = StepSpec(**{"model": "tiny-llama", "batch": 2, "seq": 32, **fields})  # type: ignore[arg-type]
    fast_meter, native_meter = HostMeter(), HostMeter(fp32_matmul=False)
    fast, native = run_step(spec, fast_meter), run_step(spec, native_meter)
    assert events(fast_meter) == events(native_meter)
    assert (fast.peak_bytes, fast.step_peak_bytes, fast.breakdown, fast.timeline) == (
        native.peak_bytes,
        native.step_peak_bytes,
        native.breakdown,
        native.timeline,
    )


def test_only_half_precision_matmuls_of_real_cpu_tensors_go_through_fp32() -> None:
    """The kernel below the meter gets fp32 operands, and the result is the fp32 product rounded
    once; fp32 matmuls and mixed dtypes are torch's own (the mix still raises as torch does)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):  # under the meter's mode: sees what it hands on
        def __init__(self) -> None:
            super().__init__()
            self.mm: list[tuple[torch.dtype, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.mm.default:
                self.mm.append(tuple(a.dtype for a in args))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 128, generator=gen).bfloat16()
    b = torch.randn(128, 32, generator=gen).bfloat16()
    with Kernels() as kernels, HostMeter():
        half = torch.mm(a, b)
        single = torch.mm(a.float(), b.float())
        with pytest.raises(RuntimeError, match="dtype"):
            torch.mm(a, b.float())
    f32, bf16 = torch.float32, torch.bfloat16
    assert kernels.mm == [(f32, f32), (f32, f32), (bf16, f32)]
    assert torch.equal(half, torch.mm(a.float(), b.float()).bfloat16())
    assert half.dtype == bf16 and half.stride() == (32, 1)
    assert torch.equal(single, torch.mm(a.float(), b.float()))
    with Kernels() as kernels, HostMeter(fp32_matmul=False):
        torch.mm(a, b)
    assert kernels.mm == [(bf16, bf16)]
