"""``pytest-vram diff OLD [NEW]`` and ``pytest-vram show [PATH]``: baselines for review.

A side is a baselines folder, or a git revision whose ``baselines/`` is read with ``git show``
(never checked out), so a reviewer of a refresh pull request runs ``pytest-vram diff main``.
Every case that moved is printed with what moved in it (``explain.moved``), then the cases
added and removed; the status is 1 when a case grew beyond the tolerance. Torch-free.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Final, final

from pytest_vram import explain
from pytest_vram.baselines import BaselineError, valid_entries
from pytest_vram.result import MemoryResult
from pytest_vram.units import format_bytes

__all__ = ["Key", "diff", "load", "show"]

DEFAULT_FOLDER: Final = "baselines"


@final
@dataclasses.dataclass(frozen=True, order=True)
class Key:
    """One stored case: the device's folder, the file under it, the test id and the label."""

    device: str
    file: str
    test: str
    label: str

    def __str__(self) -> str:
        return f"{self.file}::{self.test} [{self.label}] ({self.device})"


Cases = dict[Key, MemoryResult]


def _cases(files: Iterator[tuple[str, str]], where: str) -> Cases:
    """``files``: (path under the baselines folder, text) pairs."""
    out: Cases = {}
    for relative, text in files:
        parts = PurePosixPath(relative).parts
        if len(parts) < 2 or parts[0].startswith(".") or not relative.endswith(".json"):
            continue  # the lock folder, a README
        device, file = parts[0], "/".join(parts[1:])
        for test, labels in valid_entries(text, f"{where}/{relative}", device).items():
            for label, entry in labels.items():
                out[Key(device, file, test, label)] = MemoryResult.from_dict(entry)
    return out


def _folder_files(folder: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(folder.rglob("*.json")):
        yield path.relative_to(folder).as_posix(), path.read_text(encoding="utf-8")


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise BaselineError(f"git {' '.join(args)}: {run.stderr.strip() or 'failed'}")
    return run.stdout


def _revision_files(revision: str, folder: str) -> Iterator[tuple[str, str]]:
    listed = _git("ls-tree", "-r", "--name-only", revision, "--", folder).splitlines()
    for path in sorted(listed):
        yield PurePosixPath(path).relative_to(folder).as_posix(), _git("show", f"{revision}:{path}")


def load(side: str, folder: str = DEFAULT_FOLDER) -> Cases:
    """The stored cases of ``side``: a baselines folder, or a git revision's ``folder``."""
    path = Path(side)
    if path.is_dir():
        return _cases(_folder_files(path), side)
    try:
        _git("rev-parse", "--verify", "--quiet", f"{side}^{{commit}}")
    except BaselineError:
        raise BaselineError(
            f"{side!r} is neither a baselines folder nor a git revision of this repository"
        ) from None
    return _cases(_revision_files(side, folder.rstrip("/")), f"{side}:{folder}")


def diff(
    old: Mapping[Key, MemoryResult], new: Mapping[Key, MemoryResult], tolerance: float
) -> tuple[list[str], bool]:
    """The lines a reviewer reads, and whether a case grew beyond ``tolerance``."""
    lines: list[str] = []
    grew = 0
    moved = 0
    for key in sorted(set(old) & set(new)):
        before, after = old[key], new[key]
        if before.peak_bytes == after.peak_bytes and before.breakdown == after.breakdown:
            continue
        moved += 1
        beyond = explain.drift(before.peak_bytes, after.peak_bytes) > tolerance
        grew += beyond
        flag = f"  GREW beyond {tolerance:.1%}" if beyond else ""
        lines.append(str(key))
        lines.append(f"  peak {explain.change(before.peak_bytes, after.peak_bytes)}{flag}")
        lines.extend(explain.moved(before, after, tolerance))
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    lines.extend(f"added: {key}  {format_bytes(new[key].peak_bytes)}" for key in added)
    lines.extend(f"removed: {key}  {format_bytes(old[key].peak_bytes)}" for key in removed)
    same = len(set(old) & set(new)) - moved
    lines.append(
        f"pytest-vram diff: {moved} moved ({grew} grew beyond {tolerance:.1%}), "
        f"{len(added)} added, {len(removed)} removed, {same} unchanged"
    )
    return lines, grew > 0


def show(cases: Mapping[Key, MemoryResult]) -> list[str]:
    """The stored cases as a table: device, file::test, label, peak and its largest term."""
    rows = [("device", "test", "case", "peak", "largest term")]
    for key in sorted(cases):
        r = cases[key]
        name, nbytes = max(r.breakdown.rows(), key=lambda row: row[1])
        term = f"{name} {format_bytes(nbytes)}" if nbytes else "-"
        rows.append(
            (key.device, f"{key.file}::{key.test}", key.label, format_bytes(r.peak_bytes), term)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"{len(cases)} stored cases")
    return lines
