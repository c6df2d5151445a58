"""Published numbers, reproduced on the fake meter from the configs they describe.

LOMO paper, Table 1: LLaMA-7B (6,738,415,616 parameters), fp16 mixed precision, seq 512,
batch 8, on one GPU. Model states do not depend on batch or sequence, so these cases trace a
short batch. The paper's mixed-precision layout is DeepSpeed ZeRO-0's: fp16 weights, and an
optimizer that keeps fp32 master weights (4 bytes per parameter) plus AdamW's two fp32 moments
(8 bytes). Published in GB of 2**30 bytes.

The totals are the sums of the columns (102.20 = 12.55 + 12.55 + 75.31 + 1.79); without
checkpointing all three printed totals are 1.00 GB above their columns' sum (147.02, 96.81 and
59.40 against 146.02, 95.81 and 58.40), a slip in the table. The paper's LLaMA ran
transformers' eager attention of 2023 (4.28-4.30), so the activation cases trace eager.
LOMO's 0.24 GB of gradients is its largest single one, the fp16 embedding's (32000 x 4096 x
2 B = 0.244 GiB): LOMO updates and drops each gradient as the next arrives, and at its step's
peak (the loss) it holds none.

Further down: the orderings of LLaMA-Factory users' 8-GPU ZeRO-3 measurements (Juejin article,
2025) on simulated ranks, and QLoRA's weight size. ``python benchmarks/reference_table.py`` prints every
figure here beside ours, DeepSpeed's estimator and LLaMA-Factory's table, with the error.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vram_budget(
    gb=200, device="fake", model="llama-7b", method="full", batch=1, seq=16
)

LOMO_TABLE_1_GB = {"params": 12.55, "grads": 12.55, "adamw_state": 75.31, "sgd_state": 25.10}
LOMO_TABLE_1_ACTIVATIONS_GB = {"ckpt": 1.79, "no_ckpt": 45.61}
LOMO_TABLE_1_TOTALS_GB = {"adamw": 102.20, "sgd": 51.99, "lomo": 14.58}  # with checkpointing
GIB = 2**30
# LLaMA-7B's shape, and the paper's batch
LAYERS, HEADS, HIDDEN, VOCAB = 32, 32, 4096, 32000
BATCH, SEQ = 8, 512
PAPER = {"batch": BATCH, "seq": SEQ, "precision": "fp16", "attention": "eager"}


def gb(nbytes: int) -> float:
    return nbytes / GIB


def test_lomo_table_1_weights_and_gradients(vram) -> None:
    """fp16 weights and fp16 gradients: 2 bytes per parameter each. DeepSpeed's own fp16
    optimizer also keeps fp32 gradient accumulators (4 bytes more per parameter); the paper's
    column, like a plain half-precision step, counts the fp16 gradients only."""
    r = vram.step(precision="fp16")
    assert gb(r.breakdown.param_bytes) == pytest.approx(LOMO_TABLE_1_GB["params"], rel=0.10)
    assert gb(r.breakdown.grad_bytes) == pytest.approx(LOMO_TABLE_1_GB["grads"], rel=0.10)
    assert round(gb(r.breakdown.param_bytes), 2) == LOMO_TABLE_1_GB["params"]  # to the digit


@pytest.mark.parametrize(("optimizer", "column"), [("adamw", "adamw_state"), ("sgd", "sgd_state")])
def test_lomo_table_1_optimizer_state_under_mixed_precision(
    vram, optimizer: str, column: str
) -> None:
    """AdamW: fp32 master + two fp32 moments = 12 bytes per parameter; SGD without momentum:
    the fp32 master only, 4 bytes."""
    r = vram.step(precision="fp16", optimizer=optimizer, zero=0)
    state = r.ranks[0].breakdown.optimizer_bytes
    assert gb(state) == pytest.approx(LOMO_TABLE_1_GB[column], rel=0.10)
    assert round(gb(state), 2) == LOMO_TABLE_1_GB[column]


def test_lomo_table_1_ordering_holds_on_the_traced_steps(vram) -> None:
    """The table's point: LOMO < SGD < AdamW in total, with activation checkpointing."""
    steps = [vram.step(optimizer=o, grad_ckpt=True) for o in ("lomo", "sgd", "adamw")]
    vram.assert_ordered(*steps)


def activations(r) -> int:
    """What a LOMO step holds beyond its weights: it keeps no optimizer state, and gradients
    only one at a time, so this is the activation column (with the step's temporaries)."""
    return r.peak_bytes - r.breakdown.param_bytes - r.breakdown.buffer_bytes


def test_lomo_table_1_totals_with_activation_checkpointing(vram) -> None:
    """LOMO's row is one traced step. The AdamW and SGD rows are the paper's sums, of our
    columns: traced fp16 weights and gradients, the mixed-precision optimizer state laid out
    as DeepSpeed ZeRO-0 keeps it, and the activation column from the traced LOMO step."""
    lomo = vram.step(optimizer="lomo", grad_ckpt=True, **PAPER)
    assert gb(lomo.peak_bytes) == pytest.approx(LOMO_TABLE_1_TOTALS_GB["lomo"], rel=0.10)
    fp16 = vram.step(precision="fp16")
    for optimizer in ("sgd", "adamw"):
        state = vram.step(precision="fp16", optimizer=optimizer, zero=0).ranks[0]
        total = (
            fp16.breakdown.param_bytes
            + fp16.breakdown.grad_bytes
            + state.breakdown.optimizer_bytes
            + activations(lomo)
        )
        assert gb(total) == pytest.approx(LOMO_TABLE_1_TOTALS_GB[optimizer], rel=0.10)


def test_lomo_table_1_activations_with_checkpointing(vram) -> None:
    """Not reproduced within 10%: ours is 2.59 GiB against 1.79. At the peak, the backward of
    the loss, transformers holds the fp32 logits, their log-softmax and its gradient, 3 x b x s
    x V x 4 B = 1.46 GiB, beside the checkpointed hidden states (b x s x h x 2 B per layer,
    1.00 GiB): the paper's figure leaves no room for both. Ours is above the paper's by less
    than those loss terms."""
    lomo = vram.step(optimizer="lomo", grad_ckpt=True, **PAPER)
    checkpoints = LAYERS * BATCH * SEQ * HIDDEN * 2
    loss_fp32 = 3 * BATCH * SEQ * VOCAB * 4
    assert activations(lomo) > checkpoints + loss_fp32
    paper = LOMO_TABLE_1_ACTIVATIONS_GB["ckpt"] * GIB
    assert paper < activations(lomo) < paper + loss_fp32


def test_lomo_table_1_activations_without_checkpointing(vram) -> None:
    """Eager attention keeps, per layer, the fp32 softmax of the b x heads x s x s scores and
    its fp16 cast for the backward (6 B per score), which sdpa never materialises: 12.00 GiB at
    b8 s512. Ours, eager, is 36.34 GiB against the paper's 45.61 (-20%). transformers 4.28-4.30
    also clamped the scores with torch.max(scores, finfo.min), whose backward keeps its fp16
    input: 2 B per score more, 4.00 GiB, which brings ours to 40.34 (-11.6%). The rest is not
    explained by the paper, which does not say how it measured the column."""
    eager = vram.step(optimizer="lomo", **PAPER)
    sdpa = vram.step(optimizer="lomo", **{**PAPER, "attention": "sdpa"})
    scores = LAYERS * BATCH * HEADS * SEQ * SEQ
    assert activations(eager) - activations(sdpa) == pytest.approx(6 * scores, rel=0.01)
    paper = LOMO_TABLE_1_ACTIVATIONS_GB["no_ckpt"] * GIB
    clamp_2023 = 2 * scores
    assert activations(eager) < activations(eager) + clamp_2023 < paper


# LLaMA-Factory users' 8-GPU measurements (Juejin article, 2025): 8 x RTX 4090 48 GB, DeepSpeed
# ZeRO-3, bf16, gradient checkpointing (LLaMA-Factory's default), batch 2 per device; GB summed
# over the 8 GPUs as nvidia-smi shows them. The article does not give the sequence length
# (LLaMA-Factory pads each batch to its longest sample, up to cutoff_len), so these cases trace
# 1024 tokens and check the orderings.
# "LoRA 4-bit + offload" is ZeRO-3 with parameters and optimizer offloaded to the CPU.
EIGHT_GPU_GB = {
    "deepseek-r1-distill-qwen-1.5b": {
        "full": 77.03,
        "freeze": 38.92,
        "qlora": 32.97,
        "qlora offload": 30.97,
        "qlora offload b1": 29.77,
    },
    # DeepSeek-R1-Distill-Qwen-32B is Qwen2.5-32B's architecture. Full: out of memory.
    "qwen2.5-32b": {"freeze": 133.75, "qlora": 75.42, "qlora offload": 188.8},
}
EIGHT_GPU = {"precision": "bf16", "batch": 2, "seq": 1024, "grad_ckpt": True, "zero": 3, "ranks": 8}
EIGHT_GPU_CARD_GIB = 48


@pytest.mark.parametrize("model", list(EIGHT_GPU_GB))
def test_llama_factory_8_gpu_orderings_hold_on_every_rank(vram, model: str) -> None:
    """full > freeze, full > LoRA 4-bit >= + offload >= + batch 1, per rank: offloading
    parameters and optimizer state can only move device memory to the host, which the
    simulation does and a correct engine does (``suites/test_zero.py`` checks the real one).
    The article's 32B pair breaks the third (188.8 GB with offload, 75.42 without). Ours puts
    the offloaded run at 191.0 GB as nvidia-smi would sum it (1.2% from the article) and the
    other higher still: every rank holds the packed 4-bit weights gathered until the backward,
    which offload does not move (the test below). Where LoRA 4-bit sits against freeze depends
    on the model's size."""
    full = vram.step(model=model, method="full", **EIGHT_GPU)
    freeze = vram.step(model=model, method="freeze", **EIGHT_GPU)
    qlora = vram.step(model=model, method="qlora", **EIGHT_GPU)
    offload = vram.step(model=model, method="qlora", offload="both", **EIGHT_GPU)
    batch_1 = vram.step(model=model, method="qlora", offload="both", **{**EIGHT_GPU, "batch": 1})
    vram.assert_ordered(batch_1, offload, qlora, full)
    vram.assert_lt(freeze, full)
    vram.assert_lt(offload, qlora, term="model_state")
    assert offload.host_offload_bytes > 0


@pytest.mark.parametrize(
    ("model", "above_freeze"), [("deepseek-r1-distill-qwen-1.5b", False), ("qwen2.5-32b", True)]
)
def test_qlora_under_zero3_holds_each_gathered_4_bit_weight_until_its_backward(
    vram, model: str, above_freeze: bool
) -> None:
    """bitsandbytes' Linear4bit hands MatMul4Bit a view of its gathered packed weight
    (``weight.t()``), which MatMul4Bit keeps for its backward (``ctx.tensors``); DeepSpeed's
    release (``free_param``: ``param.data = torch.empty(0)``) drops only the parameter's own
    reference. So every rank holds the whole packed model when the backward starts, not an
    eighth of it (``tests/test_zero_simulation.py`` measures this on the real engine, and
    DeepSpeed pull request 8189 fixed the same hold for plain Linear layers). At 1.5B that is
    less than freeze's trained state; at 32B, 16 GiB of packed weights per rank put LoRA 4-bit
    above freeze. The article measured 32B LoRA 4-bit at 75.42 GB against freeze's 133.75 over
    its 8 GPUs; transformers issue 24395 reported 4-bit loading raising GPU memory under
    ZeRO-3, as here."""
    freeze = vram.step(model=model, method="freeze", **EIGHT_GPU)
    qlora = vram.step(model=model, method="qlora", **EIGHT_GPU)
    packed = qlora.param_dtype_bytes["uint8"]  # the whole model's, as traced before sharding
    rank = qlora.ranks[0].breakdown
    assert rank.param_bytes < packed  # partitioned: a rank keeps less than the packed weights
    assert rank.activation_bytes > packed  # gathered and held, with the step's activations
    if above_freeze:
        vram.assert_lt(freeze, qlora)
    else:
        vram.assert_lt(qlora, freeze)


def test_llama_factory_8_gpu_32b_full_fine_tuning_does_not_fit_48_gb_cards(vram) -> None:
    """The article's 32B full run ran out of memory as training started. ZeRO-3 bf16 keeps 20
    bytes per parameter (2 of weights, 6 of gradients: the bf16 partition and its fp32 copy,
    12 of optimizer state), over 8 ranks 76 GiB each before any activation."""
    full = vram.step(model="qwen2.5-32b", method="full", **EIGHT_GPU)
    rank = full.ranks[0].breakdown
    model_state = rank.param_bytes + rank.grad_bytes + rank.optimizer_bytes
    assert model_state == pytest.approx(20 * full.total_params / 8, rel=0.001)
    assert gb(model_state) > EIGHT_GPU_CARD_GIB


def test_qlora_7b_base_weights(vram) -> None:
    """REFERENCES: "LLaMA-7B 4-bit base weights about 5 GB" (no configuration given). Ours:
    bitsandbytes' NF4 with double quantization packs the decoder's linear layers into 3.24e9
    bytes plus 0.10e9 of constants (4.127 bits per parameter); embed_tokens and lm_head are not
    quantized, and peft's prepare_model_for_kbit_training upcasts them, the norms and the
    adapters to fp32: 1.13e9 bytes more. 4.47e9 bytes, 11% under 5 GB read as 10**9 bytes (17%
    under 5 GiB). A GPU also holds the CUDA context, which no tensor meter counts."""
    r = vram.step(method="qlora", precision="bf16", grad_ckpt=True, seq=2048)
    packed = r.param_dtype_bytes["uint8"]
    assert packed * 2 == 6_476_005_376  # two 4-bit codes per byte: the decoder's linears
    unquantized = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN + r.trainable_params
    assert r.param_dtype_bytes == {"float32": 4 * unquantized, "uint8": packed}
    constants = 103_013_248  # 8-bit absmax per 64 weights, their fp32 scales, code tables
    rotary = 2 * (HIDDEN // HEADS // 2) * 4  # inv_freq and its original copy, fp32
    assert r.breakdown.buffer_bytes == constants + rotary
    assert r.breakdown.param_bytes == packed + 4 * unquantized
