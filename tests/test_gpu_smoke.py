"""benchmarks/gpu_smoke.py without a GPU: its no-GPU exit, its pure parts and its generated project.

The script is loaded by path (benchmarks/ is not a package). What needs a GPU is the script's
own job; here it must refuse at once, and everything it computes or writes must be right.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"
NO_GPU_END = "; gpu_smoke checks the --gpu path and needs an NVIDIA GPU"


def load() -> ModuleType:
    """The script as a module; sys.path is given back as it was (the script adds its folder)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


smoke = load()
cases = smoke.cases


def script(*args: str, cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    argv, full = [sys.executable, str(SCRIPT), *args], {**os.environ, **env}
    proc = subprocess.run(argv, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


def gpu_listed() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return listed.returncode == 0 and bool(cases.parse_gpus(listed.stdout))


def nvidia_smi(folder: Path, body: str) -> str:
    """A PATH whose nvidia-smi is a shell script running ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    (folder / "nvidia-smi").chmod(0o755)
    return os.pathsep.join([str(folder), os.environ.get("PATH", "")])


# -- no GPU: exit 2 at once, no log folder -------------------------------------------------------


@pytest.mark.skipif(gpu_listed(), reason="nvidia-smi lists a GPU here: run the script itself")
def test_this_machine_has_no_gpu_so_the_script_exits_2_at_once(tmp_path: Path) -> None:
    proc, seconds = script(cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("no GPU visible: ") and line.endswith(NO_GPU_END)
    assert proc.stdout == ""
    assert seconds < 30, "decided from nvidia-smi, before torch is imported anywhere"
    assert list(tmp_path.iterdir()) == [], "no log folder without a GPU"
    proc, _ = script("--out", str(tmp_path / "logs"), "--quick", cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "logs").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script stand-in for nvidia-smi")
def test_a_failing_nvidia_smi_is_no_gpu(tmp_path: Path) -> None:
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    proc, _ = script(cwd=tmp_path, PATH=nvidia_smi(tmp_path / "bin", f'echo "{said}"; exit 9'))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"no GPU visible: nvidia-smi -L exited 9 listing no GPU: {said}" + NO_GPU_END
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script stand-in for nvidia-smi")
def test_a_gpu_torch_cannot_see_is_no_gpu(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU, but CUDA_VISIBLE_DEVICES hides it (on any machine): torch decides."""
    listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-2b4e6f8a-1c3d-5e7f-9a0b-2c4d6e8f0a1b)"
    path = nvidia_smi(tmp_path / "bin", f'echo "{listing}"')
    proc, _ = script(cwd=tmp_path, PATH=path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("no GPU visible: torch.cuda.is_available() is False (torch ")
    assert "CUDA_VISIBLE_DEVICES=''" in message and message.endswith(NO_GPU_END)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_importing_the_script_imports_no_torch_and_runs_nothing(tmp_path: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_smoke', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['gpu_smoke'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'pytest_vram', 'pynvml') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"
    assert list(tmp_path.iterdir()) == []


# -- the pure parts ----------------------------------------------------------------------------


def row(key: str, status: str, detail: str = "", seconds: float = 1.0) -> Any:
    return smoke.Row(key, f"check {key}", status, detail, seconds)


def test_table_aligns_the_columns_and_counts_the_statuses() -> None:
    rows = [
        row("1", "pass", "torch 2.6.0, CUDA 12.4", 2.04),
        row("5d", "skip", "deepspeed is not installed", 0.0),
        row("9", "fail", "exit 3, not 4", 112.5),
    ]
    assert smoke.table(rows).splitlines() == [
        "step  check     status  seconds  detail",
        "1     check 1   PASS        2.0  torch 2.6.0, CUDA 12.4",
        "5d    check 5d  SKIP        0.0  deepspeed is not installed",
        "9     check 9   FAIL      112.5  exit 3, not 4",
        "1 passed, 1 failed, 1 skipped",
    ]
    assert smoke.table([]).splitlines() == [
        "step  check  status  seconds  detail",
        "0 passed, 0 failed, 0 skipped",
    ]


def test_exit_code_of_the_statuses() -> None:
    assert smoke.exit_code([]) == smoke.exit_code(["skip"]) == 0
    assert smoke.exit_code(["pass", "skip", "pass"]) == 0
    assert smoke.exit_code(["pass", "fail"]) == smoke.exit_code(["fail", "skip"]) == 1
    assert smoke.exit_code(["pass", "broken"]) == 1, "anything but pass or skip is a failure"


def test_steps_are_in_priority_order_and_quick_is_the_first_three() -> None:
    keys = [s.key for s in smoke.STEPS]
    assert keys == ["1", "2", "3", "4", "5a", "5b", "5c", "5d", "5e", "6", "7", "8", "9"]
    assert [s.key for s in smoke.STEPS if s.quick] == ["1", "2", "3"]
    assert len({s.title for s in smoke.STEPS}) == len(keys)
    needs = {s.key: s.needs for s in smoke.STEPS if s.needs}
    assert needs == {"5c": "bitsandbytes", "5d": "deepspeed", "9": "xdist"}
    assert set(needs.values()) <= set(smoke.INSTALL)


def test_parse_gpus_reads_nvidia_smi_and_leaves_mig_out() -> None:
    text = (
        "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaaaaaa-0000-1111-2222-333333333333)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-bbbbbbbb-0000-1111-2222-333333333333)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccccccc-0000-1111-2222-333333333333)\n"
    )
    assert cases.parse_gpus(text) == (
        cases.Gpu(0, "NVIDIA A100-SXM4-40GB", "GPU-aaaaaaaa-0000-1111-2222-333333333333"),
        cases.Gpu(1, "NVIDIA H100 80GB HBM3", "GPU-cccccccc-0000-1111-2222-333333333333"),
    )
    assert cases.parse_gpus("No devices were found\n") == ()


def test_readers_of_snippets_and_reports(tmp_path: Path) -> None:
    assert cases.last_json('noise\n{"a": 1}\n{not json\nmore noise\n') == {"a": 1}
    assert cases.last_json("nothing here") is None
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
        '<testcase name="a"/><testcase name="b"><failure message="out of memory: boom">'
        "tail</failure></testcase></testsuite></testsuites>"
    )
    assert cases.junit_failures(xml) == ["out of memory: boom\ntail"]
    assert cases.junit_counts(xml) == {"tests": "2", "failures": "1", "errors": "0", "skipped": "0"}
    assert cases.junit_failures(tmp_path / "none.xml") == [] == cases.json_cases(tmp_path / "x")
    report = tmp_path / "vram.json"
    report.write_text(json.dumps({"schema": 1, "cases": [{"label": "x"}]}))
    assert cases.json_cases(report) == [{"label": "x"}]
    # the line pytest_vram/session.py adds to a failing GPU case, path with a space
    line = (
        "memory snapshot of [tiny-llama lora adamw bf16 b2 s64]: /r/my reports/snapshots/"
        "tiny-llama-1a2b.pickle (open it in https://pytorch.org/memory_viz)"
    )
    found = cases.SNAPSHOT.search(line)
    assert found is not None and found[1] == "/r/my reports/snapshots/tiny-llama-1a2b.pickle"


def test_run_keeps_the_output_and_kills_at_the_timeout(tmp_path: Path) -> None:
    ctx = smoke.Context(tmp_path, ROOT, dict(os.environ), ())
    ok = smoke.run(
        ctx, "ok", [sys.executable, "-c", "print('out'); import sys; sys.exit(3)"], cwd=tmp_path
    )
    assert (ok.returncode, ok.log) == (3, "01-ok")
    assert (tmp_path / "01-ok.stdout").read_text() == "out\n"
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.perf_counter()
    hung = smoke.run(ctx, "hung", slow, cwd=tmp_path, timeout_s=0.5)
    assert hung.returncode is None and "killed after" in hung.output
    assert time.perf_counter() - start < 30
    assert "02-hung: exit None" in (tmp_path / "commands.log").read_text()


def test_main_writes_the_project_and_the_table_and_a_failed_step_is_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a GPU pretended and stand-in steps: the log folder, the rows, the exit status."""

    def broken(ctx: Any) -> Any:
        raise KeyError("names")

    gpu = cases.Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-1")
    monkeypatch.setattr(cases, "no_gpu_reason", lambda env: (None, (gpu,)))
    monkeypatch.setattr(
        smoke,
        "STEPS",
        (
            smoke.Step("1", "first", lambda ctx: ("pass", f"on {ctx.gpus[0].uuid}"), quick=True),
            smoke.Step("2", "second", broken),
            smoke.Step("3", "third", lambda ctx: ("pass", ""), needs="no_such_module_here"),
        ),
    )
    out = tmp_path / "logs"
    assert smoke.main(["--out", str(out)]) == 1
    steps = json.loads((out / "steps.json").read_text())
    assert [(s["key"], s["status"]) for s in steps] == [("1", "pass"), ("2", "fail"), ("3", "skip")]
    assert steps[0]["detail"] == "on GPU-1"
    assert steps[1]["detail"] == "gpu_smoke error: KeyError: 'names'"
    assert steps[2]["detail"].startswith("no_such_module_here is not installed: ")
    assert (out / "summary.txt").read_text().endswith("1 passed, 1 failed, 1 skipped\n")
    assert sorted(p.name for p in (out / "project").iterdir()) == sorted(cases.project_files())
    assert f"gpu_smoke: logs in {out}" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path / "logs")  # no --out: a timestamped folder here
    assert smoke.main(["--quick"]) == 0
    (folder,) = (tmp_path / "logs").glob("gpu-smoke-*")
    assert len(folder.name) == len("gpu-smoke-20250101T120000Z") and folder.name.endswith("Z")
    assert [s["key"] for s in json.loads((folder / "steps.json").read_text())] == ["1"]


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
    canned(
        monkeypatch,
        ran(0, cases_=[cuda_case(peak_source="nvml")]),
        ran(0, cases_=[cuda_case()]),
        ran(0, cases_=[{**cuda_case(), "result": {"meter": "host"}}]),
    )
    assert smoke.step_nvml(ctx)[0] == "pass"
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
