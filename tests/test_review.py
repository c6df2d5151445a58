"""pytest-vram diff / show: stored baselines for a reviewer, from folders or git revisions."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from pytest_vram import cli
from pytest_vram.baselines import BaselineStore
from pytest_vram.result import Breakdown, MemoryResult

MIB = 2**20


def case(label: str, activations: int) -> MemoryResult:
    b = Breakdown(param_bytes=8 * MIB, optimizer_bytes=4 * MIB, activation_bytes=activations)
    return MemoryResult(label, "host", "host-cpu", b.total_bytes, (b.total_bytes,), b)


def write(folder: Path, *cases: tuple[str, MemoryResult]) -> Path:
    entries = {test: {r.label: r.to_dict()} for test, r in cases}
    BaselineStore(folder, "host-cpu").write("suites/test_x.py", entries, {})
    return folder


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Path, Path]:
    old = write(
        tmp_path / "old",
        ("test_a", case("a b1", 10 * MIB)),
        ("test_b", case("b b1", 10 * MIB)),
        ("test_gone", case("gone", MIB)),
    )
    new = write(
        tmp_path / "new",
        ("test_a", case("a b1", 20 * MIB)),  # grew: 22 -> 32 MiB
        ("test_b", case("b b1", 10 * MIB)),
        ("test_new", case("new", 2 * MIB)),
    )
    return old, new


def test_diff_prints_what_moved_added_and_removed_and_fails_on_growth(
    sides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = sides
    assert cli.main(["diff", str(old), str(new)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "suites/test_x.json::test_a [a b1] (host-cpu)"
    assert lines[1] == "  peak 22.00 MiB -> 32.00 MiB (+10.00 MiB, +45.5%)  GREW beyond 5.0%"
    assert lines[2:4] == [
        "  what moved, at the peak:",
        "    activations and temporaries: 10.00 MiB -> 20.00 MiB (+10.00 MiB, +100.0%)",
    ]
    assert "added: suites/test_x.json::test_new [new] (host-cpu)  14.00 MiB" in lines
    assert "removed: suites/test_x.json::test_gone [gone] (host-cpu)  13.00 MiB" in lines
    assert lines[-1] == (
        "pytest-vram diff: 1 moved (1 grew beyond 5.0%), 1 added, 1 removed, 1 unchanged"
    )
    # within a wider tolerance the growth is reported, not failed
    assert cli.main(["diff", str(old), str(new), "--tolerance", "50%"]) == 0
    assert "GREW" not in capsys.readouterr().out


def test_diff_reads_a_git_revision_without_checking_it_out(
    sides: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = sides
    repo = tmp_path / "repo"
    (repo / "baselines").mkdir(parents=True)
    subprocess.run(["cp", "-r", f"{old}/host-cpu", str(repo / "baselines")], check=True)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0")
    git("add", "baselines")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "baselines")
    # the working tree moves on: the refresh a pull request would carry
    subprocess.run(["rm", "-r", str(repo / "baselines" / "host-cpu")], check=True)
    subprocess.run(["cp", "-r", f"{new}/host-cpu", str(repo / "baselines")], check=True)
    monkeypatch.chdir(repo)
    assert cli.main(["diff", "HEAD"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("pytest-vram diff: 1 moved")
    # the revision before the baselines existed: every case is new
    assert cli.main(["diff", "HEAD~1", "HEAD"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "pytest-vram diff: 0 moved (0 grew beyond 5.0%), 3 added, 0 removed, 0 unchanged"
    )


def test_show_lists_the_stored_cases(
    sides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = sides
    assert cli.main(["show", str(old)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["device", "test", "case", "peak", "largest", "term"]
    assert lines[1].split()[:4] == ["host-cpu", "suites/test_x.json::test_a", "a", "b1"]
    assert lines[1].endswith("activations and temporaries 10.00 MiB")
    assert lines[-1] == "3 stored cases"


def test_bad_sides_are_one_line_and_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["diff", "no-such-folder-or-rev"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "pytest-vram diff: 'no-such-folder-or-rev' is neither a baselines folder nor a git "
        "revision of this repository\n"
    )
    broken = tmp_path / "b" / "host-cpu"
    broken.mkdir(parents=True)
    (broken / "test_x.json").write_text("{not json")
    assert cli.main(["show", str(tmp_path / "b")]) == 2
    assert "test_x.json is not valid JSON" in capsys.readouterr().err
    assert cli.main(["diff", str(tmp_path / "b"), str(tmp_path / "b"), "--tolerance", "5"]) == 2
    assert "--tolerance='5' is more than 1" in capsys.readouterr().err


def test_a_breakdown_that_moves_under_the_same_peak_is_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = case("a", 10 * MIB)
    b = dataclasses.replace(before.breakdown, param_bytes=6 * MIB, activation_bytes=12 * MIB)
    after = dataclasses.replace(before, breakdown=b)
    old = write(tmp_path / "old", ("test_a", before))
    new = write(tmp_path / "new", ("test_a", after))
    assert cli.main(["diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 8.000 MiB -> 6.000 MiB" in out and "1 moved (0 grew" in out
