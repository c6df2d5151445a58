"""``files``: a file is replaced whole or left as it was, with no temporary file left beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_vram import files


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_write_text_makes_the_folder_and_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "report.json"
    files.write_text(path, "first\n")
    files.write_text(path, "second é\n", sync=True)
    assert path.read_text(encoding="utf-8") == "second é\n"
    assert _beside(path) == ["report.json"]


def test_the_files_mode_is_the_umasks(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    old = os.umask(0o027)
    try:
        files.write_text(path, "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("written", [False, True])
def test_a_body_that_raises_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, written: bool
) -> None:
    path = tmp_path / "baseline.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"), files.replaced(path) as tmp:
        assert not tmp.exists() and tmp.parent == path.parent
        if written:
            tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert _beside(path) == ["baseline.json"]


def test_each_writer_gets_its_own_temporary(tmp_path: Path) -> None:
    path = tmp_path / "shared.pickle"
    with files.replaced(path) as first, files.replaced(path) as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert path.read_bytes() == b"1"  # the outer body ends last: its rename wins
    assert _beside(path) == ["shared.pickle"]
