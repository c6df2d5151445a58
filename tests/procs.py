"""Processes as /proc shows them, for tests that check a case leaves none behind.

A pid can be a zombie for a moment (a case child is reaped by the forkserver, a rank or helper
reparented to an init that may not reap), so "running" excludes zombies and "gone" is: no
/proc entry, or a zombie, within a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group(pgid: int) -> list[int]:
    """The running members of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def assert_gone(named: dict[str, int], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := {n: p for n, p in named.items() if running(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"still running after the case: {left}"
