"""Time overhead of the host meter against the same step unmetered, measured side by side.

Both run ``run_step`` in this process, alternating, so machine noise hits both alike; the
unmetered run uses a meter that reads nothing. Goal: host / unmetered <= 1.3.

    python benchmarks/meter_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pytest_vram import StepSpec
from pytest_vram.meters.base import Breakdown, Roles, StepMeasure
from pytest_vram.meters.host import HostMeter
from pytest_vram.step import run_step

SPECS = (
    StepSpec(model="tiny-llama", method="full", batch=2, seq=128),
    StepSpec(model="tiny-llama", method="lora", batch=4, seq=128),
    StepSpec(model="tiny-llama", method="lora", batch=4, seq=128, grad_ckpt=True),
    StepSpec(model="tiny-qwen2-vl", method="lora", batch=2, seq=128),
)


class Unmetered:
    """Same protocol, reads nothing: what the step costs without a meter."""

    name = "none"
    device = "cpu"

    def fingerprint(self) -> str:
        return "none"

    def __enter__(self) -> Unmetered:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step_begin(self) -> None:
        pass

    def step_end(self, roles: Roles) -> StepMeasure:
        return StepMeasure(0, Breakdown())


def seconds(spec: StepSpec, meter: object) -> float:
    start = time.perf_counter()
    run_step(spec, meter)  # type: ignore[arg-type]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for spec in SPECS:  # warm up imports and caches once per spec
        seconds(spec, Unmetered())
    print(f"{'spec':<48} {'unmetered s':>12} {'host s':>8} {'ratio':>6}")
    ratios = []
    for spec in SPECS:
        bare, host = [], []
        for _ in range(args.repeat):
            bare.append(seconds(spec, Unmetered()))
            host.append(seconds(spec, HostMeter()))
        b, h = statistics.median(bare), statistics.median(host)
        ratios.append(h / b)
        print(f"{spec.label:<48} {b:>12.3f} {h:>8.3f} {h / b:>6.2f}")
    print(f"median ratio host / unmetered: {statistics.median(ratios):.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
