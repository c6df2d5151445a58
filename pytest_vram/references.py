"""Published memory figures that ``pytest-vram estimate`` prints beside its own trace.

Typed data, each with its source; nothing here imports torch. The project's reference notes say
how the numbers were read. Which row of LLaMA-Factory's table a step reads is declared by its
method and optimizer (``llama_factory_row``, ``base_weight_bits``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final, final

from pytest_vram import methods
from pytest_vram.methods import LlamaFactoryRow

__all__ = [
    "LLAMA_FACTORY",
    "LLAMA_FACTORY_SOURCE",
    "QWEN_32B_DEEPSPEED",
    "QWEN_32B_DEEPSPEED_LARGEST_LAYER",
    "QWEN_32B_DEEPSPEED_PARAMS",
    "QWEN_32B_DEEPSPEED_SOURCE",
    "EstimatorFigure",
    "TableRow",
    "TableValue",
    "llama_factory",
]

LLAMA_FACTORY_SOURCE: Final = (
    "LLaMA-Factory README, 'Hardware Requirement' (*estimated*), "
    "github.com/hiyouga/LLaMA-Factory/blob/00409ff28a30f48d13b808029d37861423673a4a/README.md; "
    "reprinted as an image in LLaMA-Factory users' 8-GPU measurements (Juejin article, 2025)"
)


@final
@dataclasses.dataclass(frozen=True)
class TableRow:
    """One row of LLaMA-Factory's table: its Method cell as printed, bits, and GB by size."""

    method: str
    bits: int
    gb: Mapping[int, float]  # model size in billions of parameters -> GB as printed
    gb_per_billion: float  # the table's `x`B column: 18x GB -> 18.0


LLAMA_FACTORY: Final[tuple[TableRow, ...]] = (
    # "bf16 or fp16" is mixed precision: fp32 weights (hence 32 bits) and an autocast compute.
    TableRow("Full (bf16 or fp16)", 32, {7: 120, 14: 240, 30: 600, 70: 1200}, 18),
    TableRow("Full (pure_bf16)", 16, {7: 60, 14: 120, 30: 300, 70: 600}, 8),
    TableRow("Freeze/LoRA/GaLore/APOLLO/BAdam", 16, {7: 16, 14: 32, 30: 64, 70: 160}, 2),
    TableRow("QLoRA", 8, {7: 10, 14: 20, 30: 40, 70: 80}, 1),
    TableRow("QLoRA", 4, {7: 6, 14: 12, 30: 24, 70: 48}, 0.5),
    TableRow("QLoRA", 2, {7: 4, 14: 8, 30: 16, 70: 24}, 0.25),
)

# A model within this fraction of a column's size reads that column (6.7B and 7.6B -> 7B,
# 32.8B -> 30B); any other size reads the `x`B formula.
_COLUMN_TOLERANCE: Final = 0.15
_SIXTEEN_BIT: Final = ("bf16", "fp16")


@final
@dataclasses.dataclass(frozen=True)
class TableValue:
    row: TableRow
    column: int | None  # the size column read, in B; None: the `x`B formula
    gb: float

    @property
    def where(self) -> str:
        per_b = self.row.gb_per_billion
        size = f"{self.column}B" if self.column is not None else f"`x`B formula {per_b:g}x GB"
        return f"{self.row.method}, {self.row.bits} bits, {size}"


def _row(method: str, optimizer: str, precision: str) -> TableRow | None:
    """The table row for a step, or None when the table has no row for it."""
    trained = methods.METHODS[method]
    family: LlamaFactoryRow | None = trained.llama_factory_row
    if family is LlamaFactoryRow.FULL:  # the model's own weights: the optimizer's row
        family = methods.OPTIMIZERS[optimizer].llama_factory_row
    if family is None:
        return None
    # A quantized base has its own bits; otherwise amp-* and fp32 keep 32-bit base weights.
    bits = trained.base_weight_bits or (16 if precision in _SIXTEEN_BIT else 32)
    for row in LLAMA_FACTORY:
        if row.method.split(" (")[0] == family.value and row.bits == bits:
            return row
    return None


def llama_factory(method: str, optimizer: str, precision: str, params: int) -> TableValue | None:
    """LLaMA-Factory's estimate for ``params`` base-model parameters, None without a row."""
    row = _row(method, optimizer, precision)
    if row is None:
        return None
    billions = params / 1e9
    for size, gb in row.gb.items():
        if abs(billions - size) <= _COLUMN_TOLERANCE * size:
            return TableValue(row, size, gb)
    return TableValue(row, None, row.gb_per_billion * billions)


QWEN_32B_DEEPSPEED_SOURCE: Final = (
    "DeepSpeed's estimator output for Qwen2.5-32B-Instruct, as quoted by an article on its "
    "full fine-tuning with LLaMA-Factory on H100s, where ZeRO-3 offload ran out of memory "
    "(LLaMA-Factory discussion, 2025)"
)


@final
@dataclasses.dataclass(frozen=True)
class EstimatorFigure:
    """One line of DeepSpeed's estimator output as the article quotes it (GB = GiB: DeepSpeed
    divides by 2**30)."""

    zero: int
    offload: str  # as in StepSpec.offload
    gpu_gb: float
    cpu_gb: float | None  # None: the article quotes no CPU figure for this line


# DeepSpeed's docs call the *_all_live estimators on AutoModel.from_pretrained(...), the bare
# Qwen2Model: no lm_head, so 32_763_876_352 - 152_064 * 5_120 parameters. On 1 GPU, 1 node,
# deepspeed 0.19.8 prints exactly these figures for that count (tests/test_estimate.py).
QWEN_32B_DEEPSPEED_PARAMS: Final = 31_985_308_672
QWEN_32B_DEEPSPEED_LARGEST_LAYER: Final = 152_064 * 5_120  # embed_tokens
QWEN_32B_DEEPSPEED: Final[tuple[EstimatorFigure, ...]] = (
    EstimatorFigure(3, "none", 539, None),  # "pure GPU"
    EstimatorFigure(3, "both", 2.9, 804),
    # The article says ZeRO-2; DeepSpeed's ZeRO-2 line prints 59.58 GB GPU. 62.48 is ZeRO-3's
    # offload_param=none, offload_optimizer=cpu line (its CPU figure, 714.93, is ZeRO-2's too).
    EstimatorFigure(3, "optimizer", 62.5, 715),
)
