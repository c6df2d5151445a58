"""Files written whole or not at all: a reader (another xdist worker, the next session, a CI
upload step, a browser) sees the old file or the new one, never half of one.

Torch-free: the pytest process writes baselines and reports with it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replaced", "write_text"]


@contextlib.contextmanager
def replaced(path: str | Path) -> Iterator[Path]:
    """A path beside ``path``, not yet there, for the body to create; moved over ``path`` when
    the body ends, removed when it raises. Its name is this call's own, so writers of one file
    in several processes never share one (the last rename wins)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str, *, sync: bool = False) -> None:
    """``text`` in UTF-8 at ``path``, its folder made. ``sync``: on disk before the rename, so
    that a crash of the machine leaves the old file or the new, not an empty one. The mode is
    the umask's, as for any file the user writes (``mkstemp``'s 0600 would outlive the
    rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
