"""What a memory snapshot costs a fake case, which records one by default (``--vram-snapshots
failed`` keeps it where the test fails): the trace with and without one, side by side in one
process, and the writing alone (``memory_viz.write_snapshot``, at the meter's exit).

* Qwen2.5-7B LoRA, bf16, b1 s1024, checkpointing, three steps (the real-size gallery's step);
* Qwen2.5-32B QLoRA, ZeRO-3 on 8 ranks, bf16, b2 s1024, checkpointing (LLaMA-Factory's 8-GPU
  runs).

Each trace is run twice and the faster kept; the libraries' first use is paid by a warm-up.

    python benchmarks/snapshots.py
"""

from __future__ import annotations

import tempfile
import time

from pytest_vram import StepSpec
from pytest_vram.meters import host, memory_viz
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.step import run_step

SPECS = (
    StepSpec.from_kwargs(
        model="qwen2.5-7b", method="lora", batch=1, seq=1024, steps=3, grad_ckpt=True
    ),
    StepSpec.from_kwargs(
        model="qwen2.5-32b", method="qlora", batch=2, seq=1024, grad_ckpt=True, zero=3, ranks=8
    ),
)


def main() -> None:
    writes: list[float] = []
    write = memory_viz.write_snapshot

    def timed_write(*args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        write(*args, **kwargs)  # type: ignore[arg-type]
        writes.append(time.perf_counter() - start)

    host.write_snapshot = timed_write  # type: ignore[attr-defined]  # the meter's exit calls it
    run_step(StepSpec(model="tiny-llama", method="qlora"), FakeMeter())  # the libraries' first use
    with tempfile.TemporaryDirectory(prefix="pytest-vram-snapshots-") as folder:
        for spec in SPECS:
            plain, recorded = [], []
            writes.clear()
            for _ in range(2):
                for snapshot_dir, times in ((None, plain), (folder, recorded)):
                    start = time.perf_counter()
                    run_step(spec, FakeMeter(snapshot_dir=snapshot_dir))
                    times.append(time.perf_counter() - start)
            without, with_ = min(plain), min(recorded)
            print(
                f"{spec.label:55} without {without:5.2f} s, with a snapshot {with_:5.2f} s "
                f"({with_ / without - 1:+.0%}); writing it {min(writes):4.2f} s"
            )


if __name__ == "__main__":
    main()
