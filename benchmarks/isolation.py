"""Per-case overhead of the isolated worker against a cold ``import torch, transformers, peft``.

Both are measured in this one run, side by side: the cold import is what a case would pay if it
started a fresh interpreter; the worker forks a preloaded server instead. Goal: >= 20x cheaper.

    python benchmarks/isolation.py [--cases 20] [--cold 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from pytest_vram.worker import Job, Worker


def noop() -> None:
    """An empty case: what remains is the cost of isolation itself."""


def cold_import_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args()

    worker = Worker()
    start = time.perf_counter()
    first = worker.run(Job("host", fn=noop), timeout_s=120)
    startup = time.perf_counter() - start
    assert not hasattr(first, "kind"), first
    per_case = []
    for _ in range(args.cases):
        start = time.perf_counter()
        worker.run(Job("host", fn=noop), timeout_s=120)
        per_case.append(time.perf_counter() - start)
    cold = [cold_import_s() for _ in range(args.cold)]

    case_s = statistics.median(per_case)
    cold_s = statistics.median(cold)
    print(f"worker start-up (server preload + first case): {startup:.3f} s")
    print(f"per case, median of {args.cases}: {case_s * 1000:.1f} ms")
    print(f"cold import torch+transformers+peft, median of {args.cold}: {cold_s:.3f} s")
    print(f"ratio cold import / per case: {cold_s / case_s:.0f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
