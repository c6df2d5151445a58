"""Time overhead of the host meter against the same step unmetered, measured side by side.

All run ``run_step`` in this process, alternating, so machine noise hits them alike: unmetered
(a meter that reads nothing), an empty torch dispatch mode (the floor of any op-watching meter,
torch's MemTracker included), the host meter with torch's own kernels (``fp32_matmul=False``:
the overhead of watching, like for like), and the host meter as the plugin runs it, with bf16
and fp16 matmuls through the fp32 kernel (``meters.watch``). Goals: host with torch's kernels /
unmetered <= 1.3; the host meter as run no slower than unmetered.

    python benchmarks/meter_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.utils._python_dispatch import TorchDispatchMode

from pytest_vram import StepSpec
from pytest_vram.meters.base import Meter, Roles
from pytest_vram.meters.host import HostMeter
from pytest_vram.result import Breakdown, StepMeasure
from pytest_vram.step import run_step

SPECS = (
    StepSpec(model="tiny-llama", method="full", batch=2, seq=128),
    StepSpec(model="tiny-llama", method="lora", batch=4, seq=128),
    StepSpec(model="tiny-llama", method="lora", batch=4, seq=128, grad_ckpt=True),
    StepSpec(model="tiny-qwen2-vl", method="lora", batch=2, seq=128),
)


class Unmetered(Meter):
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


class _Pass(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


class EmptyDispatch(Unmetered):
    """Every op goes through Python and straight back: the cost of watching at all."""

    def __enter__(self) -> EmptyDispatch:
        self._mode = _Pass()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(None, None, None)


def seconds(spec: StepSpec, meter: Meter) -> float:
    start = time.perf_counter()
    run_step(spec, meter)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for spec in SPECS:  # warm up imports and caches once per spec
        seconds(spec, Unmetered())
    print(
        f"{'spec':<44} {'unmetered s':>11} {'dispatch s':>10} {'host s':>7} {'as run s':>8} "
        f"{'floor':>6} {'host':>6} {'as run':>6}"
    )
    ratios, floors, as_run = [], [], []
    for spec in SPECS:
        bare, empty, host, fast = [], [], [], []
        for _ in range(args.repeat):
            bare.append(seconds(spec, Unmetered()))
            empty.append(seconds(spec, EmptyDispatch()))
            host.append(seconds(spec, HostMeter(fp32_matmul=False)))
            fast.append(seconds(spec, HostMeter()))
        b, e, h, f = (statistics.median(x) for x in (bare, empty, host, fast))
        ratios.append(h / b)
        floors.append(e / b)
        as_run.append(f / b)
        print(
            f"{spec.label:<44} {b:>11.3f} {e:>10.3f} {h:>7.3f} {f:>8.3f} "
            f"{e / b:>6.2f} {h / b:>6.2f} {f / b:>6.2f}"
        )
    print(
        f"median ratio host with torch's kernels / unmetered: {statistics.median(ratios):.2f} "
        f"(goal <= 1.3); empty dispatch mode / unmetered: {statistics.median(floors):.2f}; "
        f"host as run / unmetered: {statistics.median(as_run):.2f} (goal <= 1)"
    )


if __name__ == "__main__":
    main()
