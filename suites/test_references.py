"""Published numbers, reproduced on the fake meter from the configs they describe.

LOMO paper, Table 1: LLaMA-7B (6,738,415,616 parameters), fp16 mixed precision, seq 512,
batch 8, on one GPU. Model states do not depend on batch or sequence, so these cases trace a
short batch. The paper's mixed-precision layout is DeepSpeed ZeRO-0's: fp16 weights, and an
optimizer that keeps fp32 master weights (4 bytes per parameter) plus AdamW's two fp32 moments
(8 bytes). Published in GB of 2**30 bytes.

Not yet reproduced here (see the note of the fake-meter issue): the activation column (1.79 GB
with checkpointing at b8 s512, 45.61 without) and so the totals; LOMO's 0.24 GB of gradients
(our breakdown counts gradients freed inside LOMO's fused step as temporaries).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vram_budget(
    gb=200, device="fake", model="llama-7b", method="full", batch=1, seq=16
)

LOMO_TABLE_1_GB = {"params": 12.55, "grads": 12.55, "adamw_state": 75.31, "sgd_state": 25.10}
GIB = 2**30


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
def test_lomo_table_1_optimizer_state_under_mixed_precision(vram, optimizer: str, column: str) -> None:
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
