"""benchmarks/gpu_smoke.py without a GPU: its no-GPU exit and its pure parts.

What needs a GPU is the script's own job; here it must refuse at once, and everything it
computes or writes must be right. Its generated project and the verdicts of its GPU steps are
test_gpu_smoke_steps.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gpu_smoke_script import ROOT, SCRIPT, cases, smoke

NO_GPU_END = "; gpu_smoke checks the --gpu path and needs an NVIDIA GPU"


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
    assert set(needs.values()) <= set(smoke.cases.INSTALL)


def smoke_table(doc: Path, section: str) -> list[tuple[str, str]]:
    """(key, title) of each row of the first table under ``section``: its first cell, read
    without markdown's backticks, is "<key> <title>"."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"\n{section}\n")
    end = text.find("\n#", start + len(section) + 2)
    lines = text[start : end if end >= 0 else len(text)].splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| step |"))
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        key, title = line.split("|")[1].strip().replace("`", "").split(" ", 1)
        rows.append((key, title))
    return rows


@pytest.mark.parametrize(
    ("doc", "section"),
    [
        ("README.md", "### On a GPU"),
        ("docs/gpu.md", "## Before the first GPU run: the smoke check"),
    ],
)
def test_the_docs_list_the_scripts_steps_as_it_names_them(doc: str, section: str) -> None:
    steps = [(s.key, s.title) for s in smoke.STEPS]
    assert smoke_table(ROOT / doc, section) == steps


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
