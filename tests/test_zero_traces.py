"""The fake meter traces a step once for all of a session's ZeRO specs of it (``zero.traces``):
each reused trace lays its spec out exactly as a trace of its own would."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from pytest_vram import StepSpec, methods
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.methods.full import Full
from pytest_vram.result import MemoryResult
from pytest_vram.step import run_step
from pytest_vram.zero import simulation
from pytest_vram.zero.traces import TraceStore

LLAMA_FACTORY = Path(__file__).parents[1] / "suites" / "data" / "llama_factory"
# One step under every stage, offload and rank count: the first traces, the others reuse it.
SWEEP = [
    {"zero": 3, "ranks": 2},
    {"zero": 3, "ranks": 2, "offload": "both"},
    {"zero": 3, "ranks": 4, "offload": "param"},
    {"zero": 2, "ranks": 2, "offload": "optimizer"},
    {"zero": 1, "ranks": 8},
    {"zero": 0, "ranks": 2},
]


def _same(a: MemoryResult, b: MemoryResult) -> bool:
    return (
        dataclasses.replace(a, snapshot_path=None).to_json()
        == dataclasses.replace(b, snapshot_path=None).to_json()
    )


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_a_zero_sweep_traces_its_step_once_and_lays_each_spec_out_as_its_own_trace(
    tmp_path: Path, method: str
) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    specs = [StepSpec(model="tiny-llama", method=method, batch=2, seq=64, **f) for f in SWEEP]
    run_step(specs[0], FakeMeter())  # a library's first use may leave a cached tensor behind
    traced_events = []
    for spec in specs:
        meter = FakeMeter(trace_dir=str(tmp_path))
        kept = run_step(spec, meter)
        traced_events.append(len(meter.ledger.events))
        assert _same(kept, run_step(spec, FakeMeter())), spec.label
    assert traced_events[0] > 0 and traced_events[1:] == [0] * (len(SWEEP) - 1)
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_another_step_is_traced_for_itself(tmp_path: Path) -> None:
    zero3 = StepSpec(model="tiny-llama", batch=2, seq=64, zero=3, ranks=2)
    for spec in (zero3, dataclasses.replace(zero3, seq=32), dataclasses.replace(zero3, steps=3)):
        meter = FakeMeter(trace_dir=str(tmp_path))
        run_step(spec, meter)
        assert len(meter.ledger.events) > 0, spec.label
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_a_users_deepspeed_file_is_traced_every_time(tmp_path: Path) -> None:
    """Its "auto" values are filled in from the model, which a kept trace does not have."""
    spec = StepSpec(
        model="tiny-llama", method="lora", deepspeed=str(LLAMA_FACTORY / "ds_z3_config.json")
    )
    assert TraceStore.key(simulation.plain(spec), spec) is None
    for _ in range(2):
        meter = FakeMeter(trace_dir=str(tmp_path))
        run_step(spec, meter)
        assert len(meter.ledger.events) > 0
    assert list(tmp_path.iterdir()) == []


class _Renamed(Full):
    """Another method under full's name, as a test that registers its own would do."""


def test_a_method_registered_under_a_known_name_has_traces_of_its_own() -> None:
    spec = StepSpec(model="tiny-llama", zero=2, ranks=2)
    plain = simulation.plain(spec)
    key = TraceStore.key(plain, spec)
    saved = methods.snapshot()
    methods.METHODS["full"] = _Renamed()
    try:
        assert TraceStore.key(plain, spec) != key
    finally:
        methods.restore(saved)
    assert TraceStore.key(plain, spec) == key


def test_each_case_that_reuses_a_trace_gets_its_own_copy_of_the_snapshot(tmp_path: Path) -> None:
    snapshots, traces = tmp_path / "snapshots", tmp_path / "traces"
    zero3 = StepSpec(model="tiny-llama", batch=1, seq=32, zero=3, ranks=2)
    results = [
        run_step(spec, FakeMeter(str(snapshots), trace_dir=str(traces)))
        for spec in (zero3, dataclasses.replace(zero3, offload="both"), zero3)
    ]
    paths = [r.snapshot_path for r in results]
    assert all(paths) and len(set(paths)) == 3
    first = Path(paths[0]).read_bytes()  # type: ignore[arg-type]
    assert all(Path(p).read_bytes() == first for p in paths[1:])  # type: ignore[arg-type]
    # The session drops a passing case's snapshot: the next case still gets one.
    for p in paths:
        os.unlink(p)  # type: ignore[arg-type]
    again = run_step(zero3, FakeMeter(str(snapshots), trace_dir=str(traces)))
    assert again.snapshot_path and Path(again.snapshot_path).read_bytes() == first


def test_a_session_keeps_its_traces_until_it_ends(vram_project) -> None:  # type: ignore[no-untyped-def]
    """Two ZeRO specs of one step in a test: the trace file the first wrote is the one the
    second found (not written again), and the session's folder is gone after the run."""
    vram_project.write(
        """
        from pathlib import Path

        import pytest

        from pytest_vram.plugin import SESSION

        @pytest.mark.vram_budget(gb=1, device="fake", model="tiny-llama", batch=1, seq=32)
        def test_sweep(vram, request):
            folder = Path(request.config.stash[SESSION].job("fake").meter_options["trace_dir"])
            print("TRACES", folder)
            vram.step(zero=3, ranks=2)
            (trace,) = folder.glob("*.json")
            written = trace.stat().st_ino
            vram.step(zero=3, ranks=2, offload="both")
            assert [t.stat().st_ino for t in folder.glob("*.json")] == [written]
        """
    )
    result = vram_project.run("--vram-update", "-s")
    result.assert_outcomes(passed=1)
    (folder,) = [Path(m[1]) for line in result.outlines if (m := re.search(r"TRACES (\S+)", line))]
    assert folder.name == "traces" and not folder.parent.exists()
