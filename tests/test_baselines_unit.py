"""``BaselineStore`` on tmp_path files, for what test_baseline_files.py (hand-edited and hostile
files) does not cover: the merge's counts, removal of unused entries, the deterministic format,
merging with another writer's entries, device folders and the write lock."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from baseline_docs import GOOD, entry
from filelock import FileLock

from conftest import LABEL
from pytest_vram.baselines import BaselineError, BaselineStore, Invalid, safe_name
from pytest_vram.result import MemoryResult

MODULE = "suites/test_mem.py"
OTHER = entry(peak_bytes=310, step_peak_bytes=[310, 260, 260])


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines", "host-cpu")


def on_disk(store: BaselineStore, module: str = MODULE) -> dict[str, Any]:
    entries: dict[str, Any] = json.loads(store.path_for(module).read_text("utf-8"))["entries"]
    return entries


def test_a_missing_file_reads_as_empty_and_creates_nothing(store: BaselineStore) -> None:
    assert store.load(MODULE) == {}
    assert store.get(MODULE, "test_a", LABEL) is None
    assert not store.root.exists()


def test_written_entries_read_back_as_results(store: BaselineStore) -> None:
    merge = store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    assert (merge.created, merge.updated, merge.unchanged, merge.written) == (1, 0, 0, True)
    assert store.path_for(MODULE) == store.root / "host-cpu" / "suites" / "test_mem.json"
    fresh = BaselineStore(store.root, "host-cpu")
    assert fresh.get(MODULE, "test_a", LABEL) == MemoryResult.from_dict(GOOD)
    assert fresh.get(MODULE, "test_a", "another label") is None
    assert fresh.get(MODULE, "test_b", LABEL) is None


def test_one_write_counts_created_updated_and_unchanged(store: BaselineStore) -> None:
    store.write(MODULE, {"test_a": {LABEL: entry()}, "test_b": {LABEL: entry()}}, {})
    merge = store.write(
        MODULE, {"test_a": {LABEL: entry()}, "test_b": {LABEL: OTHER}, "test_c": {LABEL: OTHER}}, {}
    )
    assert (merge.created, merge.updated, merge.unchanged, merge.removed) == (1, 1, 1, 0)
    assert on_disk(store) == {
        "test_a": {LABEL: GOOD},
        "test_b": {LABEL: OTHER},
        "test_c": {LABEL: OTHER},
    }
    assert (merge.replaced, merge.kept) == ((), ())


def test_the_file_is_sorted_indented_json_whatever_the_order_written(tmp_path: Path) -> None:
    one = BaselineStore(tmp_path / "one", "host-cpu")
    two = BaselineStore(tmp_path / "two", "host-cpu")
    tests = {"test_\u00fc": {LABEL: entry()}, "test_a": {LABEL: entry()}}
    one.write(MODULE, tests, {})
    two.write(MODULE, dict(reversed(tests.items())), {})
    text = one.path_for(MODULE).read_text("utf-8")
    assert text == two.path_for(MODULE).read_text("utf-8")
    doc = {"device": "host-cpu", "entries": tests, "schema": 1}
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert '"test_\u00fc"' in text  # ids stay readable, not \u escapes


def test_removing_unused_labels_and_tests_keeps_the_rest(store: BaselineStore) -> None:
    cases = {LABEL: entry(), f"{LABEL} #2": entry()}
    store.write(MODULE, {"test_a": dict(cases), "test_b": dict(cases), "test_c": dict(cases)}, {})
    merge = store.write(MODULE, {}, {"test_a": {f"{LABEL} #2", "no such label"}, "test_b": None})
    assert (merge.removed, merge.written) == (3, True)
    assert on_disk(store) == {"test_a": {LABEL: GOOD}, "test_c": cases}
    assert set(store.load(MODULE)) == {"test_a", "test_c"}
    assert store.write(MODULE, {}, {"test_gone": None}).removed == 0


def test_removing_the_last_entry_deletes_the_file(store: BaselineStore) -> None:
    store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    merge = store.write(MODULE, {}, {"test_a": {LABEL}})
    assert (merge.removed, merge.written) == (1, True)
    assert not store.path_for(MODULE).exists()
    assert store.load(MODULE) == {} and store.get(MODULE, "test_a", LABEL) is None


def test_a_write_merges_into_the_file_as_another_writer_left_it(store: BaselineStore) -> None:
    """Each xdist worker has a store of its own: what another wrote since this one read the
    file is kept, and this store then reads the merged file."""
    assert store.load(MODULE) == {}  # read, and cached, before the other writer
    other = BaselineStore(store.root, "host-cpu")
    other.write(MODULE, {"test_b": {LABEL: OTHER}}, {})
    merge = store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    assert merge.created == 1
    assert on_disk(store) == {"test_a": {LABEL: GOOD}, "test_b": {LABEL: OTHER}}
    assert set(store.load(MODULE)) == {"test_a", "test_b"}


def test_a_repeated_case_may_be_keyed_by_its_label_and_a_number(store: BaselineStore) -> None:
    store.write(MODULE, {"test_a": {f"{LABEL} #3": entry(), f"{LABEL} #x": entry()}}, {})
    assert store.get(MODULE, "test_a", f"{LABEL} #3") == MemoryResult.from_dict(GOOD)
    with pytest.raises(BaselineError, match="does not match its key"):
        store.get(MODULE, "test_a", f"{LABEL} #x")
    # an entry this write made invalid is kept and said to be, never dropped silently
    merge = store.write(MODULE, {}, {"test_a": None})
    assert [(i.test, i.label) for i in merge.kept] == [("test_a", f"{LABEL} #x")]
    assert merge.removed == 1


# A file as an editor or another JSON tool leaves it: same entries, other text.
HAND_FORMATS = {
    "no trailing newline": lambda doc: json.dumps(doc, sort_keys=True, indent=2),
    "indent 4": lambda doc: json.dumps(doc, sort_keys=True, indent=4) + "\n",
    "unsorted, one line": lambda doc: json.dumps(dict(reversed(doc.items()))),
    "escaped ids": lambda doc: json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True),
}


@pytest.mark.parametrize("dump", HAND_FORMATS.values(), ids=HAND_FORMATS)
def test_a_write_that_changes_no_entry_leaves_a_hand_formatted_file_alone(
    store: BaselineStore, dump: Any
) -> None:
    """Only the entries decide: rewriting a file whose text alone differs would churn the
    user's diff, and a refresh does not say it reformatted anything."""
    path = store.path_for(MODULE)
    path.parent.mkdir(parents=True)
    # test_c is invalid (a string peak): kept as it is, so it must not force a write either
    tests = {"test_\u00fc": {LABEL: GOOD}, "test_b": {LABEL: OTHER}}
    tests["test_c"] = {LABEL: entry(peak_bytes="300")}
    path.write_text(dump({"schema": 1, "device": "host-cpu", "entries": tests}), "utf-8")
    before, content = path.stat(), path.read_bytes()
    merge = store.write(MODULE, {"test_b": {LABEL: OTHER}}, {"test_gone": None})
    assert (merge.unchanged, merge.created, merge.removed, merge.written) == (1, 0, 0, False)
    assert [(i.test, i.label) for i in merge.kept] == [("test_c", LABEL)]
    after = path.stat()
    assert path.read_bytes() == content
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # a change of one entry writes the whole file in the canonical form
    assert store.write(MODULE, {"test_b": {LABEL: GOOD}}, {}).written
    doc = json.loads(path.read_text("utf-8"))
    canonical = json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert path.read_text("utf-8") == canonical
    assert doc["entries"]["test_c"] == tests["test_c"]


def test_invalid_entry_says_where_it_is() -> None:
    assert Invalid("test_a", LABEL, "why").line("b/x.json") == f"b/x.json: test_a / {LABEL}: why"
    assert Invalid("test_a", None, "why").where == "test_a"


def test_device_names_become_folders_and_results_of_that_device_match_them(
    tmp_path: Path,
) -> None:
    device = "NVIDIA H100 80GB HBM3 / MIG 1g.10gb"
    store = BaselineStore(tmp_path, device)
    assert store.device == safe_name(device) == "NVIDIA_H100_80GB_HBM3_MIG_1g.10gb"
    store.write(MODULE, {"test_a": {LABEL: entry(device=device)}}, {})
    assert store.path_for(MODULE).parent.parent.name == store.device
    assert store.get(MODULE, "test_a", LABEL) is not None  # not "another device's"


def test_safe_name_cuts_long_names_with_a_hash_tail() -> None:
    long_a, long_b = "a" * 200, "a" * 199 + "b"
    assert len(safe_name(long_a)) == 96 and safe_name(long_a) != safe_name(long_b)
    assert safe_name(long_a).startswith("a" * 83 + "-")
    assert safe_name("..") == safe_name("") == "_"
    assert safe_name("host-cpu") == "host-cpu"


def test_the_lock_folder_is_made_once_with_a_gitignore(store: BaselineStore) -> None:
    store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    folder = store.root / ".pytest-vram-lock"
    ignore = folder / ".gitignore"
    assert ignore.read_text() == "# pytest-vram's write lock\n*\n"
    assert sorted(p.name for p in folder.iterdir()) == [".gitignore", "lock"]
    ignore.write_text("*\n")  # the user's own: left alone
    store.write(MODULE, {"test_b": {LABEL: entry()}}, {})
    assert ignore.read_text() == "*\n"


def test_a_writer_waits_for_the_lock_then_merges(store: BaselineStore) -> None:
    store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    before = store.path_for(MODULE).read_bytes()
    held = FileLock(store.root / ".pytest-vram-lock" / "lock")
    done: list[int] = []

    def write() -> None:
        other = BaselineStore(store.root, "host-cpu")
        done.append(other.write(MODULE, {"test_b": {LABEL: entry()}}, {}).created)

    with held:
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "wrote without the lock"
        assert store.path_for(MODULE).read_bytes() == before
    writer.join(30)
    assert not writer.is_alive() and done == [1]
    assert set(on_disk(store)) == {"test_a", "test_b"}


def test_a_lock_that_cannot_be_made_is_a_baseline_error(tmp_path: Path) -> None:
    root = tmp_path / "baselines"
    root.write_text("a file where the baselines folder should be")
    store = BaselineStore(root, "host-cpu")
    with pytest.raises(BaselineError, match="test_mem.json cannot be written: "):
        store.write(MODULE, {"test_a": {LABEL: entry()}}, {})
    assert root.read_text() == "a file where the baselines folder should be"
