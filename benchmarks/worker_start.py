"""What a session pays before and around its cases: the worker server's start, and a ZeRO case.

Every pytest process that runs a case starts a worker server, which imports the libraries once
(``pytest_vram.preload``): pytester's subprocess sessions, each xdist worker, ``pytest-vram
refresh``. A ZeRO case on the host meter forks its ranks from the case's child, and each rank
starts DeepSpeed's engine. Each figure is a median, also printed as a ratio to a cold ``import
torch, transformers`` measured interleaved with it in this run (no goal: the figures behind the
suite's and CI's).

* server start: a new interpreter that starts a worker and gets a no-op case's result;
* a warm ZeRO case: tiny-llama full AdamW bf16 b2 s64 under ZeRO-3 on 2 ranks, ZeRO-2 with the
  optimizer offloaded on 2 ranks, and ZeRO-3 on 4 ranks, in a worker already started.

    python benchmarks/worker_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from speed import IMPORT, seconds  # this folder is on sys.path when run as a script

# A case that measures os.getpid: nothing but the isolation around it.
START = """
import os
from pytest_vram.result import MemoryResult
from pytest_vram.worker import Job, Worker

result = Worker().run(Job("host", fn=os.getpid), timeout_s=600)
assert isinstance(result, MemoryResult), result
"""
ZERO = ((3, "none", 2), (2, "optimizer", 2), (3, "none", 4))


def zero_cases(repeat: int) -> dict[str, list[float]]:
    from pytest_vram import StepSpec
    from pytest_vram.result import MemoryResult
    from pytest_vram.worker import Job, Worker

    worker = Worker()
    specs = [
        StepSpec(model="tiny-llama", precision="bf16", batch=2, seq=64, zero=z, offload=o, ranks=r)
        for z, o, r in ZERO
    ]
    worker.run(Job("host", spec=specs[0]), timeout_s=600)  # loads DeepSpeed's ops once
    took: dict[str, list[float]] = {s.label: [] for s in specs}
    for _ in range(repeat):
        for spec in specs:
            start = time.perf_counter()
            result = worker.run(Job("host", spec=spec), timeout_s=600)
            took[spec.label].append(time.perf_counter() - start)
            assert isinstance(result, MemoryResult), result
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    imports: list[float] = []
    starts: list[float] = []
    for _ in range(args.repeat):
        imports.append(seconds(IMPORT))
        starts.append(seconds([sys.executable, "-c", START]))
    cases = zero_cases(args.repeat)
    imports.append(seconds(IMPORT))
    base = statistics.median(imports)
    print(f"cold import torch, transformers: {base:.2f} s (median of {len(imports)})")
    print(f"{'':52}{'median s':>9}{'x import':>10}")
    rows = [("server start + a no-op case", starts), *cases.items()]
    for name, took in rows:
        median = statistics.median(took)
        print(f"{name:52}{median:9.2f}{median / base:9.2f}x")


if __name__ == "__main__":
    main()
