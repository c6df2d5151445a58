"""Baseline files as found on disk, read and written through ``BaselineStore``: hand edits, bad
merges, hostile module names. Real sessions against such files are
test_baseline_file_sessions.py.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from baseline_docs import GOOD, entry, write_doc

from conftest import LABEL
from pytest_vram.baselines import BaselineError, BaselineStore, Invalid
from pytest_vram.result import MemoryResult


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines", "host-cpu")


DROP = object()  # the key is removed
# id, key path (dots into objects), bad value, what the message says of it
BAD_ENTRIES = [
    ("peak-as-string", "peak_bytes", "103926760", "peak_bytes='103926760' (a str) is not accepted"),
    ("peak-as-bool", "peak_bytes", True, "peak_bytes=True (a bool) is not accepted"),
    ("negative-peak", "peak_bytes", -1, "peak_bytes=-1 (an int) is not accepted"),
    ("term-string", "breakdown.grad_bytes", "1", "breakdown.grad_bytes='1' (a str) is not accep"),
    ("unknown-term", "breakdown.weights", 1, "unknown key breakdown.weights; terms: param_bytes"),
    ("steps-not-a-list", "step_peak_bytes", 3, "step_peak_bytes=3 (an int) is not accepted; exp"),
    ("step-string", "step_peak_bytes", [3, "2"], "step_peak_bytes[1]='2' (a str) is not accepted"),
    ("version-number", "versions.torch", 2.5, "versions['torch']=2.5 (a float) is not accepted"),
    ("versions-list", "versions", ["torch"], "versions=['torch'] (a list) is not accepted; ex"),
    ("missing-key", "peak_bytes", DROP, "missing key peak_bytes; a result needs label, "),
    ("unknown-key", "peak", 1, "unknown key peak; known keys: allocated_bytes, "),
    ("entry-schema", "schema", 2, "schema: result schema 2 is not 1"),
    ("foreign-device", "device", "nvidia-a100-80gb", "device='nvidia-a100-80gb' is not this fold"),
    ("label-not-its-key", "label", "qwen2.5-7b lora", "does not match its key; accepted: the key"),
    ("bad-spec", "spec.batch", "1", "spec: batch='1' must be an integer"),
    ("bad-rank", "ranks", [{"label": 1}], "missing key ranks[0].meter"),
]
ACCEPTED = {  # what each kind of message says would be accepted
    "(a ": "; expected ",
    "missing": "a result needs label, meter, device, peak_bytes, step_peak_bytes, breakdown",
}


def spoilt(path: str, value: Any) -> dict[str, Any]:
    bad = entry()
    *parents, last = path.split(".")
    target = bad
    for key in parents:
        target = target[key]
    if value is DROP:
        del target[last]
    else:
        target[last] = value
    return bad


@pytest.mark.parametrize(
    ("path", "value", "why"), [c[1:] for c in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES]
)
def test_invalid_entry_fails_only_the_lookups_of_it(store, path, value, why) -> None:
    file = store.path_for("test_mem.py")
    write_doc(file, {"test_bad": {LABEL: spoilt(path, value)}, "test_good": {LABEL: entry()}})

    with pytest.raises(BaselineError) as raised:
        store.get("test_mem.py", "test_bad", LABEL)
    message = str(raised.value)
    assert message.startswith(f"baseline file {file}: invalid entry test_bad / {LABEL}: "), message
    assert why in message
    assert all(accepted in message for kind, accepted in ACCEPTED.items() if kind in why)
    assert message.endswith("re-record it with: pytest-vram refresh 'test_mem.py::test_bad'")
    # the other test of the file is judged against its entry as usual
    assert store.get("test_mem.py", "test_good", LABEL) == MemoryResult.from_dict(GOOD)
    assert set(store.load("test_mem.py")) == {"test_good"}
    # under refresh the invalid entry reads as missing: its test records a new one
    refresh = BaselineStore(store.root, "host-cpu", replace_invalid=True)
    assert refresh.get("test_mem.py", "test_bad", LABEL) is None


@pytest.mark.parametrize(
    ("cases", "why"),
    [
        ([GOOD], r"test_bad: value \[\{.* must be an object of case label -> result"),
        ({LABEL: "1039"}, f"test_bad / {LABEL}: value '1039' must be an object \\(a recorded"),
    ],
    ids=["test-not-an-object", "entry-not-an-object"],
)
def test_value_that_is_not_an_object_is_invalid(store, cases, why) -> None:
    write_doc(store.path_for("test_mem.py"), {"test_bad": cases})
    with pytest.raises(BaselineError, match=f"invalid entry {why}"):
        store.get("test_mem.py", "test_bad", LABEL)


def doc_bytes(**doc: Any) -> bytes:
    return json.dumps({"schema": 1, "device": "host-cpu", "entries": {}} | doc).encode()


BAD_FILES: dict[str, tuple[bytes, str]] = {
    "not-json": (b'{"schema": 1, "entries": {oops\n', "is not valid JSON"),
    "not-utf8": (pickle.dumps({"entries": {}}), "cannot be read: 'utf-8' codec"),
    "top-level-list": (b"[1, 2]\n", "holds a JSON list, not an object with the keys"),
    "file-schema": (doc_bytes(schema=2), "has schema=2; this pytest-vram reads schema 1 only"),
    "schema-true": (doc_bytes(schema=True), "has schema=True; this pytest-vram reads schema 1"),
    "no-entries": (b'{"schema": 1, "device": "host-cpu"}', "missing key 'entries' (a baseline"),
    "unknown-key": (doc_bytes(extra=1), "unknown key 'extra' (a baseline file has exactly the"),
    "foreign-device": (doc_bytes(device="fake"), "has device='fake', but it is in the folder of"),
    "entries-a-list": (doc_bytes(entries=[]), "entries=[] must be an object (test id -> case"),
    # what a merge that kept both sides of a conflict leaves
    "duplicate-key": (
        b'{"schema": 1, "device": "host-cpu", "entries": {"test_a": {}, "test_a": {}}}',
        "has the key 'test_a' twice in one object",
    ),
}


@pytest.mark.parametrize(("content", "why"), BAD_FILES.values(), ids=BAD_FILES)
def test_unreadable_file_fails_every_lookup_and_is_never_written(store, content, why) -> None:
    path = store.path_for("test_mem.py")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    for test in ("test_a", "test_b"):
        with pytest.raises(BaselineError) as raised:
            store.get("test_mem.py", test, LABEL)
        assert str(raised.value).startswith(f"baseline file {path}"), raised.value
        assert why in str(raised.value)
    with pytest.raises(BaselineError, match=re.escape(why)):
        store.write("test_mem.py", {"test_a": {LABEL: entry()}}, {})
    assert path.read_bytes() == content
    assert os.listdir(path.parent) == [path.name]  # no temporary file left either


def test_write_replaces_invalid_entries_it_has_and_keeps_the_others_as_they_are(tmp_path) -> None:
    store = BaselineStore(tmp_path / "baselines", "host-cpu", replace_invalid=True)
    path = store.path_for("test_mem.py")
    foreign = entry(device="nvidia-h100-80gb-hbm3")
    bad = {"test_a": {LABEL: entry(peak_bytes="103926760")}, "test_d": ["not", "cases"]}
    write_doc(path, bad | {"test_b": {LABEL: entry()}, "test_c": {LABEL: foreign}})
    new = entry(peak_bytes=310, step_peak_bytes=[310, 260, 260])
    merge = store.write(
        "test_mem.py",
        {"test_a": {LABEL: new}, "test_d": {LABEL: new}},
        {"test_b": None, "test_c": None},  # test_b and test_c are gone from the module
    )
    assert merge.replaced == (
        Invalid(
            "test_a",
            LABEL,
            f"{BAD_ENTRIES[0][3]}; expected an integer >= 0 (a JSON number, no quotes)",
        ),
        Invalid("test_d", None, "value ['not', 'cases'] must be an object of case label -> result"),
    )
    # an invalid entry is never dropped, not even as unused: it is kept, and said to be
    assert [(i.test, i.label) for i in merge.kept] == [("test_c", LABEL)]
    assert (merge.created, merge.updated, merge.removed, merge.written) == (1, 1, 1, True)
    doc = json.loads(path.read_text())
    assert doc["entries"] == {"test_a": {LABEL: new}, "test_c": {LABEL: foreign}} | {
        "test_d": {LABEL: new}
    }


def test_write_that_changes_nothing_leaves_the_file_alone(store) -> None:
    path = store.path_for("test_mem.py")
    store.write("test_mem.py", {"test_a": {LABEL: entry()}}, {})
    before = path.stat()
    merge = store.write("test_mem.py", {"test_a": {LABEL: entry()}}, {})
    assert (merge.unchanged, merge.written) == (1, False)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_write_error_is_a_baseline_error_and_leaves_no_temporary_file(store, monkeypatch) -> None:
    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    path = store.path_for("test_mem.py")
    with pytest.raises(BaselineError, match=f"baseline file {re.escape(str(path))} cannot be "):
        store.write("test_mem.py", {"test_a": {LABEL: entry()}}, {})
    assert os.listdir(path.parent) == []


def test_new_file_gets_the_umask_mode_not_a_private_one(store) -> None:
    old = os.umask(0o022)
    try:
        store.write("test_mem.py", {"test_a": {LABEL: entry()}}, {})
    finally:
        os.umask(old)
    assert store.path_for("test_mem.py").stat().st_mode & 0o777 == 0o644


# "": pytest's node id for a test file outside the rootdir, given by its path
HOSTILE_MODULES = ["", "../../etc/test_x.py", "/etc/test_x.py", "a/../../b/test_x.py"]
HOSTILE_MODULES += ["..\\..\\test_x.py", "~/test_x.py", "x" * 1000 + ".py", "deep/" * 40 + "x.py"]
HOSTILE_MODULES += ["test_\x00\n*?:<>|.py"]


@pytest.mark.parametrize("module", HOSTILE_MODULES)
def test_module_path_stays_inside_the_device_folder(store, module) -> None:
    path = store.path_for(module)
    folder = store.root / "host-cpu"
    assert path.resolve().is_relative_to(folder.resolve()), path
    assert path.parent != store.root and path.suffix == ".json"
    for part in path.relative_to(folder).parts:
        assert part not in ("", ".", "..") and len(part.encode()) <= 255
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", part), part  # no hidden file


# test_llama3.1.py: with_suffix took ".1" for the extension
SHARED = [("test_llama3.1.py", "test_llama3.py"), ("test x.py", "test_x.py")]
SHARED += [("../a/test_x.py", "a/test_x.py"), ("_test_x.py", "test_x.py"), ("x.txt", "x.py")]
SHARED += [("", "_.py")]


@pytest.mark.parametrize(("one", "other"), SHARED)
def test_two_modules_never_share_a_file(store, one, other) -> None:
    """A shared file would make one module's refresh remove the other's entries as unused."""
    assert store.path_for(one) != store.path_for(other)


def test_usual_module_paths_keep_their_file_names(store) -> None:
    root = store.root / "host-cpu"
    assert store.path_for("suites/test_matrix.py") == root / "suites" / "test_matrix.json"
    assert store.path_for("test_llama3.1.py") == root / "test_llama3.1.json"
    assert store.path_for("_support/__tests__/t.py") == root / "_support" / "__tests__" / "t.json"
