"""Baseline files as found on disk, under real sessions: invalid entries fail their own tests,
refresh keeps or replaces them, hostile ids write only into the baselines and report folders,
and nothing is ever unpickled. The store's reading and writing alone is test_baseline_files.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from baseline_docs import write_doc

from conftest import LABEL, SMALL, output
from pytest_vram.baselines import BaselineStore


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


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
        # the outside file is keyed by its path from the rootdir, ".." included
        BaselineStore(root / "baselines", "host-cpu")
        .path_for("../outside/test_out.py")
        .relative_to(root)
        .as_posix(),
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


OUTSIDE = "def test_same(vram):\n    vram.step(model='tiny-llama', batch=1, seq={seq})\n"


def test_test_files_outside_the_rootdir_keep_baseline_files_of_their_own(pytester) -> None:
    """pytest gives a file outside the rootdir a node id relative to the argument that named
    it ("" for the file itself), so such files shared a key: refreshing one dropped the
    other's cases as unused. The key is the path from the rootdir, however the file is named."""
    root = pytester.mkdir("root")
    (root / "pytest.ini").write_text("[pytest]\n")
    for name, seq in (("o1", 32), ("o2", 64)):
        folder = pytester.path / "outside" / name
        folder.mkdir(parents=True)
        folder.joinpath("test_x.py").write_text(OUTSIDE.format(seq=seq))
    common = ["-p", "no:cacheprovider", "-c", "root/pytest.ini", "--rootdir=root"]
    common += ["--import-mode=importlib", "--vram-update"]
    folder = root / "baselines" / "host-cpu"

    def cases() -> dict[str, set[str]]:
        """Each baseline file (inside the device folder) -> the case labels it holds."""
        return {
            p.relative_to(folder).as_posix(): set(json.loads(p.read_text())["entries"]["test_same"])
            for p in folder.rglob("*.json")
        }

    first = pytester.runpytest(*common, "outside/o1/test_x.py", "outside/o2/test_x.py")
    first.assert_outcomes(passed=2)
    recorded = cases()
    assert sorted(recorded.values(), key=sorted) == [
        {"tiny-llama full adamw bf16 b1 s32"},
        {"tiny-llama full adamw bf16 b1 s64"},
    ], output(first)
    assert all("/outside/o" in name for name in recorded), recorded

    # A refresh of one keeps the other's entry; the file named, or its folder: the same key.
    for selection in ("outside/o1/test_x.py", "outside/o2"):
        again = pytester.runpytest(*common, selection)
        again.assert_outcomes(passed=1)
        again.stdout.fnmatch_lines(["vram baselines: 0 created, 0 updated, 1 unchanged, 0 unused"])
        assert cases() == recorded, output(again)


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
