"""DeepSpeed's ops are built and loaded with the ninja beside this Python, activated or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fresh_server import seen_by_a_case

from pytest_vram.zero.ops import ninja_first


def _bin(tmp_path: Path, ninja: bool = True, mode: int = 0o755) -> Path:
    directory = tmp_path / "venv" / "bin"
    directory.mkdir(parents=True)
    if ninja:
        (directory / "ninja").write_text("#!/bin/sh\n")
        (directory / "ninja").chmod(mode)
    return directory


def test_the_pythons_directory_goes_first_when_a_ninja_lies_there(tmp_path: Path) -> None:
    directory = _bin(tmp_path)
    python = str(directory / "python")
    assert ninja_first(python, "/usr/local/bin:/usr/bin") == f"{directory}:/usr/local/bin:/usr/bin"
    # already there, later: moved first, not repeated
    assert ninja_first(python, f"/usr/bin:{directory}") == f"{directory}:/usr/bin"
    assert ninja_first(python, "") == str(directory)


@pytest.mark.parametrize(("ninja", "mode"), [(False, 0o755), (True, 0o644)])
def test_path_is_left_alone_without_a_ninja_to_run_there(
    tmp_path: Path, ninja: bool, mode: int
) -> None:
    python = str(_bin(tmp_path, ninja, mode) / "python")
    assert ninja_first(python, "/usr/bin:/bin") == "/usr/bin:/bin"


BUILD = "from pytest_vram.zero.ops import build_ops; print(build_ops())"


def _logs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/.ninja_log"))}


def test_build_ops_without_the_venv_on_path_rebuilds_nothing() -> None:
    """``pytest-vram build-ops`` from an activated venv, then a case's process (or build-ops)
    started by the venv's python without it: a system ninja on PATH would find every op's
    command line changed and rebuild them (30-50 s each time the two alternate)."""
    pytest.importorskip("deepspeed")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        pytest.skip("TORCH_EXTENSIONS_DIR unset: the ops' build folder is torch's default")
    venv_bin = os.path.dirname(sys.executable)
    if not os.access(os.path.join(venv_bin, "ninja"), os.X_OK):
        pytest.skip("no ninja beside this Python")
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    runs = {}
    for name, path in (("activated", f"{venv_bin}{os.pathsep}{system}"), ("not", system)):
        done = subprocess.run(
            [sys.executable, "-c", BUILD],
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = _logs(Path(root))
    assert runs["activated"], f"no ninja log under {root}"
    assert runs["not"] == runs["activated"]  # no build step ran the second time


CASE_PATH = """
def seen(path):
    Path(path).write_text(os.environ["PATH"])
"""


def test_a_case_and_its_ranks_find_the_ninja_beside_python_first(tmp_path: Path) -> None:
    venv_bin = os.path.dirname(sys.executable)
    if not os.access(os.path.join(venv_bin, "ninja"), os.X_OK):
        pytest.skip("no ninja beside this Python")
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    seen = seen_by_a_case(tmp_path, CASE_PATH, {"PATH": system})
    assert seen.split(os.pathsep)[0] == venv_bin
