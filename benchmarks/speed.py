"""The speed goals, each measured beside a cold ``import torch, transformers`` in this one run.

An absolute time means little on a shared 2-core machine, so each figure is also printed as a
ratio to the median cold import, measured interleaved with it (import, case, import, case...):

* ``pytest-vram estimate`` end to end, LLaMA-7B full AdamW bf16 b1 s512 (goal <= 1.5x) and
  Qwen2.5-32B LoRA (goal <= 2.5x);
* the imports each of those estimates cannot do without (no goal: the floor under them);
* ``pytest-vram estimate --help`` and ``pytest-vram --version`` (goal < 1 s);
* with ``--suite``: the README's two commands, ``pytest suites -n auto`` (goal <= 40x) and
  ``python -m pytest -n auto`` beside it.

The trace alone (7B <= 2 s, 32B LoRA <= 6 s, peak RSS, MemTracker's time) is
``benchmarks/fake_trace.py``; the per-case isolation overhead is ``benchmarks/isolation.py``.

    python benchmarks/speed.py [--repeat 3] [--suite]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORT = [sys.executable, "-c", "import torch, transformers"]
CLI = [sys.executable, "-m", "pytest_vram.cli"]
PYTHON_C = [sys.executable, "-c"]
FLOOR = "import torch, transformers; from torch._subclasses.fake_tensor import FakeTensorMode"


@dataclass(frozen=True)
class Case:
    name: str
    argv: Sequence[str]
    # A ratio to the cold import, or seconds when ``absolute_s``.
    goal: float
    absolute_s: bool = False


CASES = (
    Case(
        "estimate llama-7b full b1 s512",
        [*CLI, "estimate", "llama-7b", "--method", "full", "--batch", "1", "--seq", "512"],
        1.5,
    ),
    Case(
        "estimate qwen2.5-32b lora b1 s512",
        [*CLI, "estimate", "qwen2.5-32b", "--method", "lora", "--batch", "1", "--seq", "512"],
        2.5,
    ),
    # What each estimate above must import before it traces anything: the model's transformers
    # class, FakeTensorMode (which imports torch._dynamo) and, for LoRA, peft (with bitsandbytes'
    # compiles deferred, as the estimate imports it). No goal: the floor under the estimates'.
    Case(
        "floor: imports of the 7B estimate",
        [*PYTHON_C, f"{FLOOR}; from transformers import LlamaForCausalLM"],
        float("inf"),
    ),
    Case(
        "floor: imports of the 32B LoRA estimate",
        [
            *PYTHON_C,
            f"import pytest_vram.deferred_compile; {FLOOR}; "
            "from transformers import Qwen2ForCausalLM; import peft",
        ],
        float("inf"),
    ),
    Case("estimate --help", [*CLI, "estimate", "--help"], 1.0, absolute_s=True),
    Case("--version", [*CLI, "--version"], 1.0, absolute_s=True),
)
SUITE = (
    Case(
        "pytest suites",
        [sys.executable, "-m", "pytest", "suites", "-n", "auto", "-q", "-p", "no:cacheprovider"],
        40.0,
    ),
    Case(
        "python -m pytest tests",
        [sys.executable, "-m", "pytest", "tests", "-n", "auto", "-q", "-p", "no:cacheprovider"],
        float("inf"),
    ),
)


def seconds(argv: Sequence[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--suite", action="store_true", help="also time the two test commands")
    args = parser.parse_args()
    seconds(IMPORT)  # the first import warms the page cache; not counted
    imports: list[float] = []
    times: dict[str, list[float]] = {}
    cases = CASES + (SUITE if args.suite else ())
    for case in cases:
        repeat = 1 if case in SUITE else args.repeat
        for _ in range(repeat):
            imports.append(seconds(IMPORT))
            times.setdefault(case.name, []).append(seconds(case.argv))
    base = statistics.median(imports)
    print(f"cold import torch, transformers: median {base:.2f} s of {len(imports)}")
    print(f"{'':36}{'median s':>9}{'x import':>10}   goal")
    for case in cases:
        took = statistics.median(times[case.name])
        ratio = took / base
        if case.absolute_s:
            goal, met = f"< {case.goal:g} s", took < case.goal
        elif case.goal == float("inf"):
            goal, met = "(no goal)", None
        else:
            goal, met = f"<= {case.goal:g}x", ratio <= case.goal
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(f"{case.name:36}{took:9.2f}{ratio:9.2f}x   {goal} {verdict}")


if __name__ == "__main__":
    main()
