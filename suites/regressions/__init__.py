"""Planted memory regressions: one importable patch per class of bug users report.

Each module imitates a real bug's mechanism in the library where it occurred (DeepSpeed, peft,
transformers, bitsandbytes) and names the public thread it imitates. Importing one patches the
library in that process only; pytest-vram imports it in each case's worker child (and in each
ZeRO rank) with ``--vram-import``:

    python -m pytest suites/test_zero.py --vram-import suites.regressions.offload_device_copy

``GALLERY`` says, for each, which shipped tests must catch it and what their failure must name.
``tests/test_regression_gallery.py`` plants each one in CI, on the tests listed in ``ci``;
``benchmarks/regression_gallery.py`` plants each one in whole suite files and prints the score.
This module is torch-free: the worker child imports it before the patch it holds.
"""

from __future__ import annotations

import dataclasses

__all__ = ["GALLERY", "Plant"]

_ZERO = "suites/test_zero.py"
_GALLERY = "suites/test_gallery_invariants.py"
_REAL = "suites/test_gallery_real_size.py"
# A drift's lines: the largest term that moved comes first.
_MOVED = "what moved, at the peak:\n    "
_DEEPSPEED_FILES = (_ZERO, "suites/test_user_stacks.py", _GALLERY)
_STEP_FILES = (
    "suites/test_methods.py",
    "suites/test_matrix.py",
    "suites/test_invariants.py",
    _GALLERY,
)


@dataclasses.dataclass(frozen=True)
class Plant:
    """One planted bug and what must catch it."""

    module: str  # under suites.regressions
    bug_class: str
    threads: tuple[str, ...]  # what each is, as the module's docstring names it
    library: str
    ci: tuple[str, ...]  # node ids the CI gallery runs, clean and planted; each must fail
    says: tuple[str, ...]  # what their failures must hold: the term that moved, or the pair
    files: tuple[str, ...]  # the suite files the benchmark plants it in (host meter)
    real_size: tuple[str, ...] = ()  # fake-meter files where it shows at real size

    @property
    def name(self) -> str:
        return f"suites.regressions.{self.module}"

    @property
    def caught_by(self) -> tuple[str, ...]:
        """The tests that must fail with it planted: every test CI runs it on."""
        return self.ci


GALLERY: tuple[Plant, ...] = (
    Plant(
        "offload_device_copy",
        "offload that raises device memory",
        ("DeepSpeed#467", "DeepSpeed#1437"),
        "DeepSpeed",
        ci=(
            f"{_ZERO}::test_zero_step[zero2-optimizer]",
            f"{_GALLERY}::test_offload_frees_the_optimizer_state_it_moves[2]",
        ),
        says=("of what offload moved stays on the device", _MOVED + "activations", "rank 1: "),
        files=_DEEPSPEED_FILES,
    ),
    Plant(
        "zero3_params_not_partitioned",
        "a higher ZeRO stage using more than a lower one",
        ("DeepSpeed#4305", "LlamaFactory#493", "DeepSpeed#2864"),
        "DeepSpeed",
        ci=(
            f"{_GALLERY}::test_zero3_holds_less_than_zero2_under_lora",
            f"{_ZERO}::test_offload_of_the_llama_factory_8_gpu_configuration",
        ),
        says=(
            "expected model_state of [tiny-llama lora adamw bf16 b2 s64 zero3 r2] < "
            "[tiny-llama lora adamw bf16 b2 s64 zero2 r2] on rank 0",
            _MOVED + "parameters: ",
            "ranks 0-1: ",
        ),
        files=_DEEPSPEED_FILES,
    ),
    Plant(
        "zero3_gathered_not_released",
        "ZeRO-3 gathered parameters not released",
        ("DeepSpeed#7670", "DeepSpeed#3025", "DeepSpeed#2864"),
        "DeepSpeed",
        ci=(
            f"{_GALLERY}::test_zero3_holds_less_than_zero2_under_lora",
            f"{_ZERO}::test_offload_of_the_llama_factory_8_gpu_configuration",
        ),
        says=(
            "expected peak of [tiny-llama lora adamw bf16 b2 s64 zero3 r2] <= "
            "[tiny-llama lora adamw bf16 b2 s64 zero2 r2] on rank 0",
            "    parameters: ",
            "ranks 0-1: ",
        ),
        files=_DEEPSPEED_FILES,
    ),
    Plant(
        "qlora_layers_left_unquantized",
        "QLoRA using more than LoRA",
        ("torchtune#1398", "LlamaFactory#4772", "torchtune#2255"),
        "transformers (bitsandbytes quantizer)",
        ci=("suites/test_invariants.py::test_method_model_states_qlora_lora_freeze_full",),
        says=(
            "expected model_state of [tiny-llama qlora adamw bf16 b2 s64] <= "
            "[tiny-llama lora adamw bf16 b2 s64]",
        ),
        files=_STEP_FILES,
        real_size=(_REAL, "suites/test_references.py::test_qlora_7b_base_weights"),
    ),
    Plant(
        "lora_input_copy",
        "adapters whose activations double (LoRA as much as full)",
        ("peft#2196", "peft#1514", "torchtune#1492"),
        "peft",
        ci=("suites/test_methods.py::test_method[lora-adamw]",),
        says=(_MOVED + "activations and temporaries: ",),
        files=_STEP_FILES,
        real_size=(_REAL,),
    ),
    Plant(
        "dora_base_recomputed",
        "adapters whose activations double (DoRA)",
        ("peft#2122", "peft#2107", "peft#2196"),
        "peft",
        ci=("suites/test_methods.py::test_method[dora-adamw]",),
        says=(_MOVED + "activations and temporaries: ",),
        files=_STEP_FILES,
    ),
    Plant(
        "ckpt_layers_not_checkpointed",
        "gradient checkpointing that silently does nothing",
        ("trl#876", "transformers#21381"),
        "transformers",
        # test_matrix.py's twin catches it too, with "assert 23981064 < 23586824": the
        # benchmark shows it; CI runs the one whose message names the term.
        ci=("suites/test_invariants.py::test_grad_ckpt_lowers_activations",),
        says=(
            "expected activations of [tiny-llama lora adamw bf16 b2 s64 ckpt] <= "
            "[tiny-llama lora adamw bf16 b2 s64]",
        ),
        files=_STEP_FILES,
        real_size=(_REAL,),
    ),
    Plant(
        "logits_kept_across_steps",
        "memory that grows from step to step",
        ("neuromancer#292", "labelmodels#4", "transformers#26284"),
        "transformers (a metrics hook)",
        ci=(
            f"{_GALLERY}::test_steady_steps_peak_the_same",
            "suites/test_methods.py::test_no_growth_across_steps",
        ),
        says=("at step 2 to ", "something is kept across steps", "activations and temporaries"),
        files=_STEP_FILES,
        real_size=(_REAL,),
    ),
    Plant(
        "adamw_8bit_state_fp32",
        "8-bit optimizer state that is not 8-bit",
        ("bitsandbytes#22",),
        "bitsandbytes",
        ci=("suites/test_invariants.py::test_8bit_and_galore_states_are_smaller_than_adamw",),
        says=(
            "expected optimizer of [tiny-llama full adamw-8bit bf16 b2 s64] < "
            "[tiny-llama full adamw bf16 b2 s64]",
        ),
        files=_STEP_FILES,
    ),
    Plant(
        "head_upcast_fp32",
        "a dtype that silently widens (fp32 norm and LM head)",
        ("peft#1149", "peft#816", "unsloth#1186"),
        "peft",
        ci=(f"{_GALLERY}::test_bf16_adapters_keep_fp32_only_in_the_adapters[lora]",),
        says=("frozen weights were upcast (weights by dtype: ",),
        files=_STEP_FILES,
        real_size=(_REAL,),
    ),
)
