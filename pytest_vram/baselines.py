"""Baseline files: ``<dir>/<device fingerprint>/<test module path>.json``.

One file per test module and device, keyed by test id then case label. Files are deterministic
JSON (sorted keys, two-space indent, trailing newline) and are only ever replaced whole: writers
take a lock (``.pytest-vram-lock/`` in the baselines folder), re-read the file, merge their own
entries and rename a temporary file over it, so pytest-xdist workers and separate pytest
processes never lose each other's updates.

Every entry is validated where the file is read. A file that cannot be read as a whole (not
JSON, not an object, an unknown schema, another device's, a key twice) is an error of every test
that reads it and is never written. An invalid entry is an error of the tests that use it only;
a refresh that re-measures it replaces it and says so, and one that does not keeps it as it is
(its JSON value written back unchanged) and says that too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final, final

from filelock import FileLock

from pytest_vram import files
from pytest_vram.result import MemoryResult

__all__ = ["BaselineError", "BaselineStore", "Entries", "Invalid", "Merge", "valid_entries"]

SCHEMA: Final = 1
_FILE_KEYS: Final = ("device", "entries", "schema")
_LOCK_DIR: Final = ".pytest-vram-lock"  # in the baselines folder; holds its own .gitignore
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_NAME: Final = 96

# test id -> case label -> MemoryResult as a dict
Entries = dict[str, dict[str, dict[str, Any]]]


class BaselineError(Exception):
    """A baseline file or entry that cannot be used; the message names the file."""


def safe_name(name: str) -> str:
    """A file-name component: unsafe characters replaced, very long names cut with a hash tail."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "_"
    if len(cleaned) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        cleaned = f"{cleaned[: _MAX_NAME - 13]}-{digest}"
    return cleaned


def _module_part(name: str) -> str:
    """A component of a module path as a file name, one to one: a name that is not already a
    plain file name gets a hash of the original, so ``test x.py`` and ``test_x.py`` (or ``..``,
    which would otherwise vanish) never share a file, and one module's refresh never drops
    another's entries as unused. Plain names, the usual case, are kept as they are."""
    if _PLAIN.fullmatch(name) and len(name) <= _MAX_NAME:
        return name
    # ".." (the way to a test file outside the rootdir) reads as such, not as a bare hash
    cleaned = "_parent" if name == ".." else _UNSAFE.sub("_", name).lstrip(".-") or "_"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{cleaned[: _MAX_NAME - 13]}-{digest}"


@final
@dataclasses.dataclass(frozen=True)
class Invalid:
    """An entry that is not a valid result: ``label`` None when the test's whole value is bad."""

    test: str
    label: str | None
    why: str

    @property
    def where(self) -> str:
        return self.test if self.label is None else f"{self.test} / {self.label}"

    def line(self, path: object) -> str:
        return f"{path}: {self.where}: {self.why}"


@final
@dataclasses.dataclass(frozen=True)
class Merge:
    """What one write changed, for the refresh counts and the summary."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    replaced: tuple[Invalid, ...] = ()  # invalid entries this write re-recorded
    kept: tuple[Invalid, ...] = ()  # invalid entries left as they are (not re-measured)
    written: bool = False


@final
@dataclasses.dataclass(frozen=True)
class _File:
    text: str | None  # None: no file
    raw: dict[str, Any]  # test id -> what the file holds for it, valid or not
    entries: Entries  # the valid entries only
    invalid: dict[tuple[str, str | None], Invalid]


@final
class BaselineStore:
    """``replace_invalid`` (refresh): an invalid entry reads as missing, so its test records a
    new one, instead of failing the test that reads it."""

    def __init__(self, root: Path, device: str, *, replace_invalid: bool = False) -> None:
        self.root = root
        self.device = safe_name(device)
        self.replace_invalid = replace_invalid
        self._cache: dict[Path, _File | BaselineError] = {}

    def path_for(self, module: str) -> Path:
        """``module`` is the test file's path relative to the rootdir, e.g. ``suites/test_x.py``.

        Node ids always use ``/``; the anchor of an absolute-looking id is dropped and every
        other component, ``..`` included, becomes a plain name, so the file stays inside the
        device's folder."""
        pure = PurePosixPath(module)
        if pure.suffix == ".py":  # not with_suffix: "test_llama3.1" must keep its ".1"
            pure = pure.with_suffix("")
        parts = [_module_part(p) for p in pure.parts if p != "/"] or [_module_part("")]
        return self.root.joinpath(self.device, *parts[:-1], f"{parts[-1]}.json")

    def _file(self, module: str) -> _File:
        path = self.path_for(module)
        if path not in self._cache:
            try:
                self._cache[path] = _read(path, self.device)
            except BaselineError as exc:
                self._cache[path] = exc
        cached = self._cache[path]
        if isinstance(cached, BaselineError):
            raise cached
        return cached

    def load(self, module: str) -> Entries:
        """The module's valid entries; BaselineError when the file cannot be read at all."""
        return self._file(module).entries

    def get(self, module: str, test: str, label: str) -> MemoryResult | None:
        file = self._file(module)
        bad = file.invalid.get((test, None)) or file.invalid.get((test, label))
        if bad is not None:
            if self.replace_invalid:
                return None
            raise BaselineError(
                f"baseline file {self.path_for(module)}: invalid entry {bad.where}: {bad.why}; "
                f"fix or delete it, or re-record it with: pytest-vram refresh '{module}::{test}'"
            )
        entry = file.entries.get(test, {}).get(label)
        return None if entry is None else MemoryResult.from_dict(entry)

    def write(self, module: str, updates: Entries, remove: Mapping[str, set[str] | None]) -> Merge:
        """Merge ``updates`` into the file and drop ``remove`` (test -> labels, None: whole test).

        Entries of other tests are kept as they are on disk now, not as this process read them.
        Invalid entries are never removed: replaced when ``updates`` has them, else kept.
        """
        path = self.path_for(module)
        try:
            with _lock(self.root):
                return self._merge(path, updates, remove)
        except OSError as exc:  # the lock or the file: disk full, permissions, ...
            raise BaselineError(f"baseline file {path} cannot be written: {exc}") from None

    def _merge(self, path: Path, updates: Entries, remove: Mapping[str, set[str] | None]) -> Merge:
        counts = {"created": 0, "updated": 0, "unchanged": 0, "removed": 0}
        replaced: list[Invalid] = []
        current = _read(path, self.device)  # a file it cannot read stops the write here
        raw = dict(current.raw)
        for test, labels in remove.items():
            cases = raw.get(test)
            if not isinstance(cases, dict) or (test, None) in current.invalid:
                continue
            doomed = {
                label
                for label in (set(cases) if labels is None else labels & set(cases))
                if (test, label) not in current.invalid
            }
            counts["removed"] += len(doomed)
            raw[test] = {k: v for k, v in cases.items() if k not in doomed}
            if not raw[test]:
                del raw[test]
        for test, new in updates.items():
            whole = current.invalid.get((test, None))
            if whole is not None:
                replaced.append(whole)
                raw[test] = {}
            cases = raw[test] = dict(raw.get(test, {}))
            for label, entry in new.items():
                bad = current.invalid.get((test, label))
                if bad is not None:
                    replaced.append(bad)
                old = cases.get(label)
                key = "created" if old is None else "unchanged" if old == entry else "updated"
                counts[key] += 1
                cases[label] = entry
        # The entries decide, not the text: a file an editor reformatted (another indent, no
        # final newline) whose entries are all as they were is left as it is, bytes and mtime.
        # Both sides go through _dump, so tuples and lists, or key order, never count.
        text = _dump(self.device, raw) if raw else None
        if current.text is None:
            changed = text is not None
        else:
            changed = text != _dump(self.device, current.raw)
        if changed:
            if text is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                files.write_text(path, text, sync=True)
        merged = self._cache[path] = _check(self.device, text if changed else current.text, raw)
        return Merge(
            **counts,
            replaced=tuple(replaced),
            kept=tuple(merged.invalid.values()),
            written=changed,
        )


def _dump(device: str, entries: Mapping[str, Any]) -> str:
    doc = {"schema": SCHEMA, "device": device, "entries": entries}
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; a merge that kept both sides would then lose one
    # silently on the next write, so such a file is not read at all.
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def _read(path: Path, device: str) -> _File:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _File(None, {}, {}, {})
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"baseline file {path} cannot be read: {exc}") from None
    return _parse(text, path, device)


def valid_entries(text: str, where: str | Path, device: str) -> Entries:
    """The valid entries of a baseline file's text (``where`` names it in errors): for
    ``pytest-vram diff``, which reads files of a git revision too."""
    return _parse(text, where, device).entries


def _parse(text: str, path: str | Path, device: str) -> _File:
    never = "fix or delete it: pytest-vram never overwrites a file it cannot read"
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline file {path} is not valid JSON ({exc}); {never}") from None
    except _DuplicateKey as exc:
        raise BaselineError(
            f"baseline file {path} has the key {exc.args[0]!r} twice in one object (a merge "
            f"that kept both sides?); {never}"
        ) from None
    except RecursionError:
        raise BaselineError(f"baseline file {path} is nested too deeply; {never}") from None
    if not isinstance(doc, dict):
        raise BaselineError(
            f"baseline file {path} holds a JSON {type(doc).__name__}, not an object with the "
            f"keys {', '.join(_FILE_KEYS)}; {never}"
        )
    missing = [k for k in _FILE_KEYS if k not in doc]
    unknown = sorted(set(doc) - set(_FILE_KEYS))
    if missing or unknown:
        what = "; ".join(
            [*(f"missing key {k!r}" for k in missing), *(f"unknown key {k!r}" for k in unknown)]
        )
        raise BaselineError(
            f"baseline file {path}: {what} (a baseline file has exactly the keys "
            f"{', '.join(_FILE_KEYS)}); {never}"
        )
    schema = doc["schema"]
    if type(schema) is not int or schema != SCHEMA:
        raise BaselineError(
            f"baseline file {path} has schema={schema!r}; this pytest-vram reads schema "
            f"{SCHEMA} only (written by another version?); {never}"
        )
    if doc["device"] != device:
        raise BaselineError(
            f"baseline file {path} has device={doc['device']!r}, but it is in the folder of "
            f"device {device!r} (copied from another device's folder?); {never}"
        )
    if not isinstance(doc["entries"], dict):
        raise BaselineError(
            f"baseline file {path}: entries={_short(doc['entries'])} must be an object "
            f"(test id -> case label -> result); {never}"
        )
    return _check(device, text, doc["entries"])


def _check(device: str, text: str | None, raw: Mapping[str, Any]) -> _File:
    """Sort the entries into valid and invalid ones (each with why it is not valid)."""
    entries: Entries = {}
    invalid: dict[tuple[str, str | None], Invalid] = {}
    for test, cases in raw.items():
        if not isinstance(cases, dict):
            shape = f"value {_short(cases)} must be an object of case label -> result"
            invalid[(test, None)] = Invalid(test, None, shape)
            continue
        for label, entry in cases.items():
            problem = _entry_problem(label, entry, device)
            if problem is None:
                entries.setdefault(test, {})[label] = entry
            else:
                invalid[(test, label)] = Invalid(test, label, problem)
    return _File(text, dict(raw), entries, invalid)


def _entry_problem(label: str, entry: object, device: str) -> str | None:
    if not isinstance(entry, dict):
        return f"value {_short(entry)} must be an object (a recorded result)"
    try:
        result = MemoryResult.from_dict(entry)
    except (TypeError, ValueError, KeyError) as exc:
        return str(exc)
    if safe_name(result.device) != device:
        return (
            f"device={result.device!r} is not this folder's device {device!r}: baselines of "
            "another device never judge this one's cases"
        )
    if label != result.label and not re.fullmatch(rf"{re.escape(result.label)} #\d+", label):
        return (
            f"label={result.label!r} does not match its key; accepted: the key itself, or the "
            "key's label followed by ' #N' for a repeated case"
        )
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    # In the baselines folder, not the temp dir: every writer of these files must take the same
    # lock whatever its TMPDIR (separate CI steps or tox envs may each have their own, and then
    # lost each other's entries). A "*" .gitignore keeps it out of git, as pytest's cache does.
    folder = root / _LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError), open(folder / ".gitignore", "x") as f:
        f.write("# pytest-vram's write lock\n*\n")
    with FileLock(folder / "lock"):
        yield
