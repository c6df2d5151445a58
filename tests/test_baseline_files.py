"""Baseline files as found on disk: hand edits, bad merges, hostile module names, no pickle.

Unit tests read and write files through ``BaselineStore``; the pytester tests at the end run
real sessions against the files those produce.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import LABEL, SMALL, output
from pytest_vram.baselines import BaselineError, BaselineStore, Invalid
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec

SPEC = StepSpec(model="tiny-llama", batch=1, seq=32)
GOOD = MemoryResult(
    label=SPEC.label,
    meter="host",
    device="host-cpu",
    peak_bytes=300,
    step_peak_bytes=(300, 250, 250),
    breakdown=Breakdown(param_bytes=100, grad_bytes=100, activation_bytes=100),
    spec=SPEC,
    versions={"torch": "2.5.0", "pytest-vram": "0.1.0"},
).to_dict()
assert SPEC.label == LABEL


def entry(**changes: Any) -> dict[str, Any]:
    return copy.deepcopy(GOOD) | changes


def write_doc(path: Path, entries: Any, **doc: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"schema": 1, "device": "host-cpu", "entries": entries} | doc
    path.write_text(json.dumps(full, sort_keys=True, indent=2, ensure_ascii=False) + "\n")
    return path.read_bytes()


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


# -- real sessions ------------------------------------------------------------------------------

THREE_TESTS = "import pytest\n" + "".join(
    f"\n@pytest.mark.vram_budget(gb=0.25)\ndef test_{name}(vram):\n    vram.step({SMALL})\n"
    for name in "abc"
)
FOREIGN = "nvidia-h100-80gb-hbm3"


def _spoil(vram_project) -> tuple[Path, str]:
    """Record three tests, then hand-edit test_a's peak into a string and test_c's device."""
    vram_project.write(THREE_TESTS)
    vram_project.record()
    path = vram_project.baseline_path()
    doc = json.loads(path.read_text("utf-8"))
    peak = str(doc["entries"]["test_a"][LABEL]["peak_bytes"])
    doc["entries"]["test_a"][LABEL]["peak_bytes"] = peak
    doc["entries"]["test_c"][LABEL]["device"] = FOREIGN
    write_doc(path, doc["entries"])
    return path, peak


def test_invalid_entries_fail_their_own_tests_and_the_others_are_judged(vram_project) -> None:
    path, peak = _spoil(vram_project)
    before = path.read_bytes()
    result = vram_project.run()
    text = output(result)
    assert "INTERNALERROR" not in text, text
    result.assert_outcomes(passed=1, failed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    fix = "fix or delete it, or re-record it with: pytest-vram refresh"
    result.stdout.fnmatch_lines(
        [
            f"baseline file {path}: invalid entry test_a / {LABEL}: peak_bytes='{peak}' (a str) "
            f"is not accepted; expected an integer >= 0 (a JSON number, no quotes); {fix} "
            "'test_mem.py::test_a'",
            f"baseline file {path}: invalid entry test_c / {LABEL}: device='{FOREIGN}' is not "
            f"this folder's device 'host-cpu'*; {fix} 'test_mem.py::test_c'",
        ]
    )
    result.stdout.re_match_lines([r"^test_mem\.py::test_b\s.*\s\+0\.0%\s+ok$"])
    assert path.read_bytes() == before


def test_refresh_keeps_invalid_entries_it_does_not_measure_and_replaces_the_others(
    vram_project,
) -> None:
    path, peak = _spoil(vram_project)
    before, inode = path.read_bytes(), path.stat().st_ino
    why_a = f"peak_bytes='{peak}' (a str) is not accepted; expected an integer >= 0"
    where = "baselines/host-cpu/test_mem.json"

    partial = vram_project.record("-k", "test_b")
    partial.assert_outcomes(passed=1, deselected=2)
    partial.stdout.fnmatch_lines(
        [
            "vram baselines: 0 created, 0 updated, 1 unchanged, 0 unused",
            f"kept invalid entry {where}: test_a / {LABEL}: {why_a}* (not re-measured, left as "
            "it is: fix it, or refresh its test)",
            f"kept invalid entry {where}: test_c / {LABEL}: device='{FOREIGN}' is not*",
        ]
    )
    assert (path.read_bytes(), path.stat().st_ino) == (before, inode)  # not even rewritten

    full = vram_project.record()
    full.assert_outcomes(passed=3)
    full.stdout.fnmatch_lines(
        [
            # no usable baseline was there: the re-measured cases count as created
            "vram baselines: 2 created, 0 updated, 1 unchanged, 0 unused",
            f"replaced invalid entry {where}: test_a / {LABEL}: {why_a}*",
            f"replaced invalid entry {where}: test_c / {LABEL}: device='{FOREIGN}' is not*",
        ]
    )
    assert "kept invalid entry" not in output(full)
    assert vram_project.entry("test_a")["peak_bytes"] == int(peak)
    assert vram_project.entry("test_c")["device"] == "host-cpu"
    vram_project.run().assert_outcomes(passed=3)


@pytest.mark.parametrize("update", [False, True], ids=["check", "update"])
def test_file_with_a_key_twice_fails_every_test_and_is_left_alone(vram_project, update) -> None:
    vram_project.write(THREE_TESTS)
    path = vram_project.baseline_path()
    content = b'{"schema": 1, "device": "host-cpu", "entries": {"test_a": {}, "test_a": {}}}\n'
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    result = vram_project.run(*(["--vram-update"] if update else []))
    assert "INTERNALERROR" not in output(result)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([f"baseline file {path} has the key 'test_a' twice in one object*"])
    assert path.read_bytes() == content


HOSTILE_IDS = ["../../escape", "/abs/olute", "a" * 300, "odd\x00?*:<>|\\\u00fc", "..\\win", "::x"]


def test_hostile_ids_and_module_names_write_only_into_baselines_and_report(
    pytester, monkeypatch
) -> None:
    monkeypatch.setattr("sys.dont_write_bytecode", True)  # no __pycache__ to tell apart
    root = pytester.mkdir("root")
    (root / "pytest.ini").write_text("[pytest]\n")
    case = f"    vram.step({SMALL})\n"
    (root / "test_llama3.py").write_text(f"def test_x(vram):\n{case}")
    (root / "test_llama3.1.py").write_text(
        f"import pytest\n\n@pytest.mark.parametrize('x', range(6), ids={HOSTILE_IDS!r})\n"
        f"def test_p(vram, x):\n{case}"
    )
    pytester.mkdir("outside").joinpath("test_out.py").write_text(f"def test_o(vram):\n{case}")
    common = ["-p", "no:cacheprovider", "-c", "root/pytest.ini", "--rootdir=root"]
    common += ["--import-mode=importlib", "--vram-update", "--vram-json=root/report/vram.json"]
    before = {p for p in pytester.path.rglob("*") if p.is_file()}

    result = pytester.runpytest(*common, "root", "outside/test_out.py")
    result.assert_outcomes(passed=8)
    created = {p for p in pytester.path.rglob("*") if p.is_file()} - before
    assert all(p.is_relative_to(root) for p in created), created
    assert {p.relative_to(root).as_posix() for p in created} == {
        "baselines/.pytest-vram-lock/lock",  # the write lock, with a .gitignore of "*"
        "baselines/.pytest-vram-lock/.gitignore",
        "baselines/host-cpu/test_llama3.json",
        "baselines/host-cpu/test_llama3.1.json",
        # the outside file's node id has an empty module part
        BaselineStore(root / "baselines", "host-cpu").path_for("").relative_to(root).as_posix(),
        "report/vram.json",
    }, output(result)
    hostile = json.loads((root / "baselines/host-cpu/test_llama3.1.json").read_text())["entries"]
    assert len(hostile) == 6 and any(test.startswith("test_p[odd") for test in hostile)
    # pytest escapes backslashes and unprintable characters in ids; the others are verbatim
    assert {
        f"test_p[{i}]" for i in HOSTILE_IDS if i.isprintable() and i.isascii() and "\\" not in i
    } < set(hostile)

    # a module of its own: refreshing test_llama3.py does not drop test_llama3.1's entries
    again = pytester.runpytest(*common, "root/test_llama3.py")
    again.assert_outcomes(passed=1)
    assert json.loads((root / "baselines/host-cpu/test_llama3.1.json").read_text())["entries"] == (
        hostile
    )


class _Opens:
    """Unpickling this creates a file: the proof a baseline reader unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.path), "w")


def test_baselines_are_never_unpickled(vram_project, monkeypatch) -> None:
    vram_project.write(THREE_TESTS)
    vram_project.record()
    marker = vram_project.path / "unpickled"
    payload = pickle.dumps(_Opens(marker))
    folder = vram_project.baseline_path().parent
    (folder / "test_mem.pickle").write_bytes(payload)
    doc = vram_project.baseline()
    doc["entries"]["test_a"][LABEL]["notes"] = [payload.decode("latin-1")]
    doc["entries"]["test_a"][LABEL]["zero_config"] = {"py/reduce": [{"py/type": "builtins.open"}]}
    write_doc(vram_project.baseline_path(), doc["entries"])
    vram_project.write(THREE_TESTS, "test_other")
    (folder / "test_other.json").write_bytes(payload)

    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> Any:
        calls.append(args)
        raise AssertionError("a baseline was unpickled")

    class Refusing(pickle.Unpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse(*args)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    result = vram_project.run()
    assert "INTERNALERROR" not in output(result), output(result)
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines([f"baseline file {folder / 'test_other.json'} cannot be read: *"])
    assert calls == [] and not marker.exists()
