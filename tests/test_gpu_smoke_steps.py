"""benchmarks/gpu_smoke.py without a GPU: the project it generates, and the verdicts of its GPU
steps on canned pytest runs. Its no-GPU exit and pure parts are test_gpu_smoke.py.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from gpu_smoke_script import ROOT, cases, smoke

# -- the generated project ---------------------------------------------------------------------


def marker_kwargs(fn: ast.FunctionDef) -> dict[str, Any]:
    (decorator,) = fn.decorator_list
    assert isinstance(decorator, ast.Call)
    assert ast.unparse(decorator.func) == "pytest.mark.vram_budget"
    return {str(kw.arg): ast.literal_eval(kw.value) for kw in decorator.keywords}


def test_generated_project_is_valid_python_with_every_case() -> None:
    files = cases.project_files()
    assert set(files) == {"pytest.ini", cases.TEST_MODULE, "smoke_fns.py"}
    assert files["pytest.ini"].startswith("[pytest]")
    for name, text in files.items():
        if name.endswith(".py"):
            compile(text, name, "exec")
    tree = ast.parse(files[cases.TEST_MODULE])
    tests = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    nodes = [cases.ONE, cases.PLAIN, cases.LEAK, cases.QLORA, *cases.ZERO, cases.OOM]
    nodes.append(cases.OVER_BUDGET)
    assert sorted(n.split("::")[1] for n in nodes) == sorted(tests)
    assert all(n.startswith(f"{cases.TEST_MODULE}::") for n in nodes)
    small = {"model": "tiny-llama", "batch": 2, "seq": 64}
    spec = {name: marker_kwargs(fn) for name, fn in tests.items()}
    assert spec["test_one"] == {"gb": 4, "method": "lora", **small}
    full = {"gb": 4, "method": "full", **small}
    assert spec["test_plain"] == {**full, "optimizer": "adamw", "precision": "bf16"}
    assert spec["test_leak"]["steps"] == 4
    assert spec["test_qlora"]["method"] == "qlora"
    assert spec["test_zero2"] == {**full, "zero": 2, "ranks": 1}
    assert spec["test_zero2_offload_optimizer"] == {
        **full,
        "zero": 2,
        "offload": "optimizer",
        "ranks": 1,
    }
    assert spec["test_zero3_offload_both"] == {**full, "zero": 3, "offload": "both", "ranks": 1}
    assert spec["test_over_budget"]["gb"] == 0.001
    assert "vram.measure(smoke_fns.allocate_twice_the_device)" in ast.unparse(tests["test_oom"])


def test_the_oom_function_and_the_snippets() -> None:
    tree = ast.parse(cases.project_files()["smoke_fns.py"])
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert fn.name == "allocate_twice_the_device"
    assert "total * 2" in ast.unparse(fn) and "device='cuda'" in ast.unparse(fn)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports, "torch is imported inside the function, never at module level"
    for name, text in cases.SNIPPETS.items():
        compile(text, name, "exec")
    # the fork-safety step probes exactly what the cuda server and a rank parent import
    assert 'worker.preload_modules("cuda")' in cases.FORK_SAFETY
    assert "tuple(worker.RANK_PARENT_MODULES)" in cases.FORK_SAFETY


# -- the verdicts of the GPU steps, on canned pytest runs -------------------------------------


def cuda_case(**result: Any) -> dict[str, Any]:
    base = {"meter": "cuda", "peak_source": "reserved", "device": "nvidia-h100-80gb-hbm3"}
    return {
        "label": "tiny-llama lora adamw bf16 b2 s64",
        "peak_bytes": 2**28,
        "baseline_bytes": 2**28,
        "notes": [],
        "result": {**base, **result},
    }


def canned(monkeypatch: pytest.MonkeyPatch, *runs: Any) -> list[tuple[Any, ...]]:
    """pytest_case replaced by ``runs``, in order; returns the calls it got."""
    calls: list[tuple[Any, ...]] = []
    queue = list(runs)

    def fake(ctx: Any, name: str, nodes: Any, *args: str, **kw: Any) -> Any:
        calls.append((name, tuple(nodes), args, kw))
        return queue.pop(0)

    monkeypatch.setattr(smoke, "pytest_case", fake)
    return calls


def ran(code: int | None, output: str = "", cases_: Any = (), failures: Any = ()) -> Any:
    return smoke.Ran(code, output, "07-x", list(cases_), list(failures))


@pytest.fixture
def ctx(tmp_path: Path) -> Any:
    return smoke.Context(tmp_path, ROOT, {}, (cases.Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-1a2b"),))


def test_oom_step(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    oom = "Failed: out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 160 GiB"
    other = "Failed: RuntimeError: CUDA error\nout of memory, later in the traceback"
    runs = [
        ran(1, failures=[oom + "\ntb"]),
        ran(3, "INTERNALERROR> x"),
        ran(0),
        ran(1, failures=[other]),
    ]
    canned(monkeypatch, *runs)
    assert smoke.step_oom(ctx) == ("pass", f"failed as expected: {oom}")
    assert smoke.step_oom(ctx)[1].startswith("INTERNALERROR")
    assert smoke.step_oom(ctx)[1].startswith("expected the test to fail (exit 1), got exit 0")
    assert "not with 'out of memory'" in smoke.step_oom(ctx)[1]


def test_snapshot_step_needs_an_existing_pickle(
    ctx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickle = tmp_path / "reports" / "snapshots" / "tiny-llama-1a2b.pickle"
    message = f"peak 0.2 GiB exceeds budget 0.001 GiB [x]\nmemory snapshot of [x]: {pickle} (open it in ...)"
    canned(monkeypatch, ran(1, failures=[message]), ran(1, failures=[message]))
    missing = f"the failure names the snapshot {pickle}, which does not exist"
    assert smoke.step_snapshot(ctx) == ("fail", missing)
    pickle.parent.mkdir(parents=True)
    pickle.write_bytes(b"12345")
    kept = "over budget, kept tiny-llama-1a2b.pickle (5 bytes)"
    assert smoke.step_snapshot(ctx) == ("pass", kept)


def test_xdist_step_wants_exit_4_naming_the_workers(
    ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = "ERROR: pytest -n 2 --gpu: 1 GPU(s) visible for 2 xdist workers: each worker needs a GPU of its own"
    calls = canned(monkeypatch, ran(4, said), ran(3, said + "\nINTERNALERROR> x"))
    assert smoke.step_xdist(ctx) == ("pass", f"exit 4: {said}")
    status, detail = smoke.step_xdist(ctx)
    assert status == "fail" and detail.startswith("exit 3, not 4; INTERNALERROR in the output")
    name, nodes, args, kw = calls[0]
    assert kw["env"] == {"CUDA_VISIBLE_DEVICES": "GPU-1a2b"} and args[:2] == ("-n", "2")


def test_nvml_and_recheck_steps_read_the_json_report(
    ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    predicted = {"nvml_bytes": 2**28 + 2**26, "device": "NVIDIA H100: ..."}
    canned(
        monkeypatch,
        ran(0, cases_=[cuda_case(peak_source="nvml", peak_bytes=2**28, prediction=predicted)]),
        ran(0, cases_=[cuda_case(peak_source="nvml")]),
        ran(0, cases_=[cuda_case()]),
        ran(0, cases_=[{**cuda_case(), "result": {"meter": "host"}}]),
    )
    status, detail = smoke.step_nvml(ctx)
    assert status == "pass"
    assert "nvml predicted 320 MiB, measured 256 MiB (NVIDIA H100: ...)" in detail
    no_prediction = "passed but its prediction has no nvml_bytes: [{}]"
    assert smoke.step_nvml(ctx) == ("fail", no_prediction)
    not_nvml = "passed but its peak_source is ['reserved'], not nvml"
    assert smoke.step_nvml(ctx) == ("fail", not_nvml)
    host = "the case: passed but the JSON report's meters are ['host']"
    assert smoke.step_one_case(ctx) == ("fail", host)

    calls = canned(monkeypatch, ran(0, cases_=[cuda_case()]), ran(0, cases_=[cuda_case()]))
    same = "re-checked: [tiny-llama lora adamw bf16 b2 s64] 0.250 GiB vs 0.250 GiB"
    assert smoke.recheck(cases.PLAIN)(ctx) == ("pass", same)
    refresh = [(c[0], c[3].get("refresh", False)) for c in calls]
    assert refresh == [("test_plain-record", True), ("test_plain-recheck", False)]
    canned(monkeypatch, ran(1, failures=["drifted +9%\n"]))
    assert smoke.recheck(cases.PLAIN)(ctx) == ("fail", "recording: exit 1: drifted +9%")
