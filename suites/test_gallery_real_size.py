"""The gallery's invariants at real size, on the fake meter: Qwen2.5-7B, one sequence of 1,024
tokens, three steps (so a leak shows as growth from step 2 to step 3).

Some regressions only matter at scale: an fp32 LM head is 1 MiB more on tiny-llama and 1.0 GiB
more on Qwen2.5-7B (152,064 words), an MLP left unquantized costs QLoRA more than the whole 4-bit
model. The fake meter traces the real configs without weights, so what peft, transformers and
bitsandbytes build at 7B is what is measured (``suites/regressions/`` plants each bug;
``benchmarks/regression_gallery.py`` plants them here too). DeepSpeed's engine does not run under
the fake meter (ZeRO is laid out by ``pytest_vram.zero.simulation``), so its regressions are the
host meter's to catch.

Budgets: a 24 GB card for the checkpointed steps (the LLaMA-Factory README's table puts 7B LoRA
at 16 GB and 4-bit QLoRA at 6 GB, without activations).
"""

from __future__ import annotations

import pytest

from pytest_vram import MemoryResult

REAL = {"model": "qwen2.5-7b", "batch": 1, "seq": 1024, "steps": 3}
pytestmark = pytest.mark.vram_budget(gb=24, device="fake", grad_ckpt=True, **REAL)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB ({nbytes:,d} B)"


def test_qlora_holds_less_model_state_than_lora_at_7b(vram) -> None:
    """LlamaFactory#4772, torchtune#2255: QLoRA above LoRA. NF4 packs the decoder's linear
    layers into about half a byte a weight; peft upcasts what is left (embeddings, head, norms)
    to fp32. At 7B that is under LoRA's bf16 base, by about 7 GiB."""
    qlora = vram.step(method="qlora")
    lora = vram.step(method="lora")
    vram.assert_lt(qlora, lora, term="model_state")
    vram.assert_lt(qlora, lora)


@pytest.mark.vram_budget(gb=32, device="fake", grad_ckpt=True, **REAL)  # markers do not merge
def test_checkpointing_lowers_activations_at_7b(vram) -> None:
    """trl#876: checkpointing asked for and not applied. Checkpointing keeps each layer's input
    only: strictly fewer activations than the step without it."""
    ckpt = vram.step(method="lora")
    plain = vram.step(method="lora", grad_ckpt=False)
    vram.assert_lt(ckpt, plain, term="activations")


def test_bf16_lora_keeps_fp32_only_in_the_adapters_at_7b(vram) -> None:
    """peft#1149: frozen weights upcast to fp32. At 7B an fp32 LM head alone is 1.0 GiB more."""
    r: MemoryResult = vram.step(method="lora")
    assert r.param_dtype_bytes.get("float32", 0) == 4 * r.trainable_params, (
        f"[{r.label}] holds {mib(r.param_dtype_bytes.get('float32', 0))} of fp32 weights, "
        f"{r.trainable_params:,d} trainable parameters are {mib(4 * r.trainable_params)}: "
        f"frozen weights were upcast (weights by dtype: {r.param_dtype_bytes})"
    )
