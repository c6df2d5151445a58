"""The shell of the workflows' steps, run with stand-ins for the commands they call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_docs import GPU_WORKFLOWS, step, workflow

# -- the shell of the steps, run with stand-ins --------------------------------------------------


def bash(script: str, cwd: Path, path: list[Path], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a step's script as Actions does (bash -eo pipefail), commands looked up in ``path`` first."""
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what a test gives
    full = {
        **inherited,
        "PATH": os.pathsep.join([*map(str, path), os.environ.get("PATH", "")]),
        "GITHUB_OUTPUT": str(cwd / "github_output"),
        "GITHUB_ENV": str(cwd / "github_env"),
        **env,
    }
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
    )


def stub(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    target.chmod(0o755)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@needs_bash
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", []),
        ('-k "lora and not qlora" -x', ["-k", "lora and not qlora", "-x"]),
        ("suites/test_matrix.py::test_full", ["suites/test_matrix.py::test_full"]),
        (
            "$(touch pwned) `touch pwned`; touch pwned",
            ["$(touch", "pwned)", "`touch", "pwned`;", "touch", "pwned"],
        ),
    ],
)
def test_refresh_passes_input_words_and_runs_nothing(
    tmp_path: Path, given: str, expected: list[str]
) -> None:
    script = step(workflow("refresh-baselines.yml"), "Re-measure and rewrite baselines")["run"]
    stub(tmp_path / "bin", "pytest-vram", 'for a in "$@"; do printf "%s\\n" "$a"; done')
    stub(tmp_path / "bin", "python", f'exec "{sys.executable}" "$@"')
    result = bash(script, tmp_path, [tmp_path / "bin"], PYTEST_ARGS=given)
    assert result.returncode == 0, result.stderr
    fixed = [
        "refresh",
        "--gpu",
        "suites",
        "-p",
        "no:cacheprovider",
        "--junitxml=reports/junit.xml",
        "--vram-json",
        "reports/vram.json",
    ]
    assert result.stdout.splitlines() == [*fixed, *expected]
    assert (tmp_path / "reports" / "refresh.log").read_text() == result.stdout
    assert not (tmp_path / "pwned").exists()


@needs_bash
def test_refresh_failure_fails_the_step(tmp_path: Path) -> None:
    script = step(workflow("refresh-baselines.yml"), "Re-measure and rewrite baselines")["run"]
    stub(tmp_path / "bin", "pytest-vram", "echo measured; exit 1")
    stub(tmp_path / "bin", "python", f'exec "{sys.executable}" "$@"')
    result = bash(script, tmp_path, [tmp_path / "bin"], PYTEST_ARGS="")
    assert result.returncode == 1, "tee must not hide the refresh's exit status"


def fake_deepspeed(site: Path, accelerator: str = "") -> Path:
    """A ``deepspeed`` package on ``site`` whose ``deepspeed.accelerator`` runs ``accelerator``."""
    package = site / "deepspeed"
    (package / "accelerator").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "accelerator" / "__init__.py").write_text(accelerator)
    return site


@needs_bash
@pytest.mark.parametrize("name", GPU_WORKFLOWS)
def test_prebuild_runs_build_ops_only_with_deepspeed(tmp_path: Path, name: str) -> None:
    script = step(workflow(name), "Prebuild DeepSpeed ops")["run"]
    # python -S: the standard library only, so deepspeed is not importable whatever is installed
    stub(tmp_path / "bin", "python", f'exec "{sys.executable}" -S "$@"')
    stub(tmp_path / "bin", "pytest-vram", 'echo "pytest-vram $*"')
    missing = bash(script, tmp_path, [tmp_path / "bin"])
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.splitlines() == ["deepspeed is not installed: no ops to prebuild"]

    site = fake_deepspeed(tmp_path / "site")
    present = bash(script, tmp_path, [tmp_path / "bin"], PYTHONPATH=str(site))
    assert present.returncode == 0, present.stderr
    assert present.stdout.splitlines() == ["pytest-vram build-ops"]


@needs_bash
@pytest.mark.parametrize("name", GPU_WORKFLOWS)
def test_prebuild_fails_on_a_broken_deepspeed(tmp_path: Path, name: str) -> None:
    """The real ``pytest-vram build-ops`` behind the step: a DeepSpeed that cannot load fails it."""
    script = step(workflow(name), "Prebuild DeepSpeed ops")["run"]
    stub(tmp_path / "bin", "python", f'exec "{sys.executable}" -S "$@"')
    stub(tmp_path / "bin", "pytest-vram", f'exec "{sys.executable}" -m pytest_vram.cli "$@"')
    site = fake_deepspeed(tmp_path / "site", "raise RuntimeError('broken deepspeed')\n")
    broken = bash(script, tmp_path, [tmp_path / "bin"], PYTHONPATH=str(site))
    assert broken.returncode != 0 and "broken deepspeed" in broken.stderr


@needs_bash
def test_summary_counts_new_baseline_files_and_leaves_the_index(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    script = step(workflow("refresh-baselines.yml"), "Summarise the changes")["run"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "baselines" / "host-cpu").mkdir(parents=True)
    empty = '{"device": "%s", "entries": {}, "schema": 1}\n'
    (tmp_path / "baselines" / "host-cpu" / "a.json").write_text(empty % "host-cpu")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "refresh.log").write_text(
        "pytest-vram refresh: 1 created, 0 updated, 0 unchanged, 0 unused\n"
    )
    env = {"PYTEST_ARGS": "-k lora", "GPU_NAME": "NVIDIA H100 80GB HBM3", "GITHUB_RUN_ID": "7"}

    unchanged = bash(script, tmp_path, [], **env)
    assert unchanged.returncode == 0, unchanged.stderr
    assert (tmp_path / "github_output").read_text().startswith("changed=false\n")

    (tmp_path / "github_output").unlink()
    new = tmp_path / "baselines" / "nvidia-h100-80gb-hbm3" / "suites" / "test_matrix.json"
    new.parent.mkdir(parents=True)
    new.write_text(empty % "nvidia-h100-80gb-hbm3")
    changed = bash(script, tmp_path, [], **env)
    assert changed.returncode == 0, changed.stderr
    output = (tmp_path / "github_output").read_text()
    assert output.startswith("changed=true\nbody<<VRAM_BODY_EOF\n")
    assert (
        "`NVIDIA H100 80GB HBM3`" in output and "pytest-vram refresh --gpu suites -k lora" in output
    )
    assert "pytest-vram refresh: 1 created" in output
    assert "baselines/nvidia-h100-80gb-hbm3/suites/test_matrix.json | 1 +" in output
    # the reviewer's case-by-case diff of the committed baselines against the refreshed ones
    assert "pytest-vram diff: 0 moved (0 grew beyond 5.0%), 0 added, 0 removed" in output
    assert output.endswith("VRAM_BODY_EOF\n")
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "?? baselines/" in status.stdout, "the index is given back as it was"


# -- schema and actionlint ---------------------------------------------------------------------
