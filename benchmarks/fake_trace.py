"""How fast and how lean the fake meter traces real-size steps, next to torch's MemTracker.

Each measurement runs in its own process, so its peak RSS is its own (torch and transformers
imported included; the baseline after imports is shown too). A tiny-llama trace with the same
tool runs first in that process: its time ("cold") is the one-off cost of torch's lazily loaded
fake-tensor machinery, which the plugin's preloaded worker server pays once, not per case.

* LLaMA-7B full fine-tuning, AdamW, bf16, b1 s512, through ``run_step`` and the fake meter;
* Qwen2.5-32B LoRA, same settings;
* the same 7B step under ``torch.distributed._tools.mem_tracker.MemTracker`` in FakeTensorMode
  (model and optimizer made in fake mode, two steps like ``run_step``'s).

Goals (issue 17): 7B <= 2 s, 32B LoRA <= 6 s, peak RSS <= 1 GiB, MemTracker >= 25x the
fake meter's time on the 7B step.

    python benchmarks/fake_trace.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

GIB = 2**30
CASES = {
    "fake 7B full": ("fake", "llama-7b", "full"),
    "fake 32B lora": ("fake", "qwen2.5-32b", "lora"),
    "MemTracker 7B full": ("memtracker", "llama-7b", "full"),
}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """This process's CPU time: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fake(model: str, method: str) -> dict[str, Any]:
    from pytest_vram import StepSpec
    from pytest_vram.meters.fake import FakeMeter
    from pytest_vram.step import run_step

    spec = StepSpec(model=model, method=method, batch=1, seq=512)
    start = time.perf_counter()
    result = run_step(spec, FakeMeter())
    seconds = time.perf_counter() - start
    rows = {name: nbytes for name, nbytes in result.breakdown.rows()}
    return {"seconds": seconds, "peak": result.peak_bytes, "breakdown": rows}


def memtracker(model: str, method: str) -> dict[str, Any]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from pytest_vram import zoo

    assert method == "full"
    start = time.perf_counter()
    with FakeTensorMode():
        net = zoo.build_model(model, torch.bfloat16)
        net.config.use_cache = False
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)  # as run_step
        tracker = MemTracker()
        tracker.track_external(net, optimizer)
        with tracker:
            for _ in range(2):
                ids = torch.randint(net.config.vocab_size, (1, 512))
                net(input_ids=ids, labels=ids.clone()).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()  # it refuses a module's second forward otherwise
    seconds = time.perf_counter() - start
    peak = tracker.get_tracker_snapshot("peak")
    (device_peak,) = peak.values()
    rows = {str(getattr(k, "value", k)): n for k, n in device_peak.items() if k != "Total"}
    return {"seconds": seconds, "peak": device_peak["Total"], "breakdown": rows}


def child(name: str) -> None:
    import torch  # noqa: F401 - the baseline RSS includes the libraries every case imports
    import transformers  # noqa: F401

    kind, model, method = CASES[name]
    trace = fake if kind == "fake" else memtracker
    baseline = _rss_bytes()
    cold = trace("tiny-llama", method)["seconds"]
    cpu = _cpu_seconds()
    out = trace(model, method)
    cpu = _cpu_seconds() - cpu
    print(
        json.dumps({**out, "cold": cold, "cpu": cpu, "rss": _rss_bytes(), "baseline_rss": baseline})
    )


def main() -> None:
    results: dict[str, dict[str, Any]] = {}
    for name in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True
        )
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{'':20}{'wall s':>8}{'CPU s':>7}{'(cold)':>8}{'peak RSS':>10}{'(imports)':>11}{'peak':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:20}{r['seconds']:8.2f}{r['cpu']:7.2f}{r['cold']:8.2f}{r['rss'] / GIB:8.2f} G"
            f"{r['baseline_rss'] / GIB:9.2f} G{r['peak'] / GIB:8.2f} G"
        )
        for row, nbytes in r["breakdown"].items():
            print(f"    {row:34}{nbytes / GIB:9.3f} GiB")
    ratio = results["MemTracker 7B full"]["seconds"] / results["fake 7B full"]["seconds"]
    print(f"MemTracker / fake meter on the 7B step: {ratio:.2f}x the time")
    print(f"goal MemTracker >= 25x the fake meter: {ratio >= 25}")
    for name, goal in (("fake 7B full", 2.0), ("fake 32B lora", 6.0)):
        print(f"goal {name} <= {goal:.0f} s: {results[name]['seconds'] <= goal}")
    print(f"goal peak RSS <= 1 GiB: {all(r['rss'] <= GIB for r in results.values())}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
