"""What the fake meter's reuse saves, each case beside itself without it, in one process:

* LOMO's layers replayed: LLaMA-7B, LOMO, fp16, b8 s512, eager attention (the LOMO paper's
  Table 1 step), with repeated decoder layers replayed against every layer traced;
* a session's ZeRO trace kept: Qwen2.5-32B QLoRA, ZeRO-3 on 8 ranks, bf16, b2 s1024 with
  checkpointing (LLaMA-Factory's 8-GPU runs), its offloaded spec after the plain one, from the
  kept trace against a trace of its own.

Each pair must give the same result; the times are the second of each (the libraries' first
use is paid by a warm-up step).

    python benchmarks/replays.py
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable

from pytest_vram import StepSpec
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.result import MemoryResult
from pytest_vram.step import run_step

# As suites/test_references.py traces them.
PAPER = {"precision": "fp16", "batch": 8, "seq": 512, "attention": "eager"}
EIGHT_GPU = {"precision": "bf16", "batch": 2, "seq": 1024, "grad_ckpt": True, "zero": 3, "ranks": 8}
LOMO = StepSpec.from_kwargs(model="llama-7b", optimizer="lomo", **PAPER)
QLORA_32B = StepSpec.from_kwargs(model="qwen2.5-32b", method="qlora", **EIGHT_GPU)


def timed(run: Callable[[], MemoryResult]) -> tuple[float, MemoryResult]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def same(a: MemoryResult, b: MemoryResult) -> bool:
    return (
        dataclasses.replace(a, snapshot_path=None).to_json()
        == dataclasses.replace(b, snapshot_path=None).to_json()
    )


def main() -> None:
    for method in ("full", "qlora"):  # the libraries' first use, outside the timings
        run_step(StepSpec(model="tiny-llama", method=method, optimizer="lomo"), FakeMeter())
    rows = []
    replayed = timed(lambda: run_step(LOMO, FakeMeter()))
    traced = timed(lambda: run_step(LOMO, FakeMeter(replay_layers=False)))
    rows.append(("LOMO 7B b8 s512 eager: layers replayed / traced", replayed, traced))

    offload = dataclasses.replace(QLORA_32B, offload="both")
    with tempfile.TemporaryDirectory(prefix="pytest-vram-traces-") as folder:
        run_step(QLORA_32B, FakeMeter(trace_dir=folder))
        kept = timed(lambda: run_step(offload, FakeMeter(trace_dir=folder)))
    own = timed(lambda: run_step(offload, FakeMeter()))
    rows.append(("32B QLoRA ZeRO-3 r8 offload: kept trace / own", kept, own))

    for name, (fast_s, fast), (slow_s, slow) in rows:
        print(
            f"{name:50} {fast_s:6.2f} s / {slow_s:6.2f} s = {slow_s / fast_s:5.1f}x faster, "
            f"the same result: {same(fast, slow)}"
        )


if __name__ == "__main__":
    main()
