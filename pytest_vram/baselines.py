"""Baseline files: ``<dir>/<device fingerprint>/<test module path>.json``.

One file per test module and device, keyed by test id then case label. Files are deterministic
JSON (sorted keys, two-space indent, trailing newline) and are only ever replaced whole: writers
take a lock, re-read the file, merge their own entries and rename a temporary file over it, so
pytest-xdist workers never lose each other's updates. A file that cannot be read is an error that
names it; it is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, final

from filelock import FileLock

from pytest_vram.meters.base import MemoryResult

__all__ = ["BaselineError", "BaselineStore", "Entries", "Merge"]

SCHEMA: Final = 1
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME: Final = 96

# test id -> case label -> MemoryResult as a dict
Entries = dict[str, dict[str, dict[str, Any]]]


class BaselineError(Exception):
    """A baseline file that cannot be used; the message names the file."""


def safe_name(name: str) -> str:
    """A file-name component: unsafe characters replaced, very long names cut with a hash tail."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "_"
    if len(cleaned) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        cleaned = f"{cleaned[: _MAX_NAME - 13]}-{digest}"
    return cleaned


@final
@dataclasses.dataclass(frozen=True)
class Merge:
    """What one write changed, for the refresh counts."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0


@final
class BaselineStore:
    def __init__(self, root: Path, device: str) -> None:
        self.root = root
        self.device = safe_name(device)
        self._cache: dict[Path, Entries] = {}

    def path_for(self, module: str) -> Path:
        """``module`` is the test file's path relative to the rootdir, e.g. ``suites/test_x.py``."""
        parts = [
            safe_name(p) for p in Path(module).with_suffix("").parts if p not in ("", ".", "..")
        ]
        return self.root.joinpath(self.device, *parts).with_suffix(".json")

    def load(self, module: str) -> Entries:
        path = self.path_for(module)
        if path not in self._cache:
            self._cache[path] = _read(path)
        return self._cache[path]

    def get(self, module: str, test: str, label: str) -> MemoryResult | None:
        entry = self.load(module).get(test, {}).get(label)
        if entry is None:
            return None
        try:
            return MemoryResult.from_dict(entry)
        except (TypeError, ValueError, KeyError) as exc:
            raise BaselineError(
                f"baseline file {self.path_for(module)} has a bad entry {test!r} / {label!r}: {exc}"
            ) from None

    def write(self, module: str, updates: Entries, remove: Mapping[str, set[str] | None]) -> Merge:
        """Merge ``updates`` into the file and drop ``remove`` (test -> labels, None: whole test).

        Entries of other tests are kept as they are on disk now, not as this process read them.
        """
        path = self.path_for(module)
        counts = {"created": 0, "updated": 0, "unchanged": 0, "removed": 0}
        with _lock(path):
            entries = _read(path)
            for test, labels in remove.items():
                current = entries.get(test, {})
                doomed = set(current) if labels is None else labels & set(current)
                counts["removed"] += len(doomed)
                for label in doomed:
                    del current[label]
                if test in entries and not current:
                    del entries[test]
            for test, cases in updates.items():
                current = entries.setdefault(test, {})
                for label, entry in cases.items():
                    old = current.get(label)
                    key = "created" if old is None else "unchanged" if old == entry else "updated"
                    counts[key] += 1
                    current[label] = entry
            if entries:
                _atomic_write(path, _dump(self.device, entries))
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._cache[path] = entries
        return Merge(**counts)


def _dump(device: str, entries: Entries) -> str:
    doc = {"schema": SCHEMA, "device": device, "entries": entries}
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _read(path: Path) -> Entries:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise BaselineError(f"baseline file {path} cannot be read: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(
            f"baseline file {path} is not valid JSON ({exc}); fix or delete it: "
            "pytest-vram never overwrites a file it cannot read"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != SCHEMA
        or not isinstance(doc.get("entries"), dict)
    ):
        raise BaselineError(
            f"baseline file {path} is not a pytest-vram schema {SCHEMA} file; fix or delete it"
        )
    entries: Entries = doc["entries"]
    for test, cases in entries.items():
        if not isinstance(cases, dict) or not all(isinstance(c, dict) for c in cases.values()):
            raise BaselineError(f"baseline file {path}: entry {test!r} is not a mapping of cases")
    return entries


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # The lock lives in the temp dir, not beside the baselines, so it never shows in a diff.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"pytest-vram-{digest}.lock")):
        yield


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
