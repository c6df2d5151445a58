"""Baseline files: record, check, refresh counts, unused entries, corrupt files, folders.

xdist workers writing one file: ``test_plugin_xdist.py``."""

from __future__ import annotations

import json

import pytest

from conftest import LABEL, SMALL, output


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


ONE_TEST = f"""
    import pytest

    @pytest.mark.vram_budget(gb=0.25)
    def test_a(vram):
        vram.step({SMALL})
"""
TWO_TESTS = (
    ONE_TEST
    + f"""

    @pytest.mark.vram_budget(gb=0.25)
    def test_b(vram):
        vram.step({SMALL})
"""
)


def test_missing_baseline_fails_with_refresh_command(vram_project) -> None:
    vram_project.write(ONE_TEST)
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            f"no baseline for [[]{LABEL}] on device host-cpu; "
            "record it with: pytest-vram refresh 'test_mem.py::test_a'"
        ]
    )
    result.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*\s-\s+-\s+FAIL no-baseline$"])
    assert not (vram_project.path / "baselines").exists()  # a plain run never writes


def test_update_creates_file_and_rerun_leaves_it_unchanged(vram_project) -> None:
    vram_project.write(ONE_TEST)
    recorded = vram_project.record()
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["vram baselines: 1 created, 0 updated, 0 unchanged, 0 unused"])
    recorded.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*\s+created$"])

    path = vram_project.baseline_path()
    text = path.read_text("utf-8")
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert doc["schema"] == 1
    assert doc["device"] == "host-cpu"
    assert list(doc["entries"]) == ["test_a"]
    entry = doc["entries"]["test_a"][LABEL]
    assert entry["label"] == LABEL
    assert entry["meter"] == "host"
    assert entry["spec"]["model"] == "tiny-llama"
    assert (entry["spec"]["batch"], entry["spec"]["seq"]) == (1, 32)
    assert entry["peak_bytes"] == max(entry["step_peak_bytes"]) > 0
    assert entry["peak_bytes"] == sum(entry["breakdown"].values())
    assert {"python", "torch", "transformers", "peft", "pytest-vram"} <= set(entry["versions"])
    before = path.read_bytes()

    checked = vram_project.run()
    checked.assert_outcomes(passed=1)
    assert "vram baselines:" not in output(checked)
    assert path.read_bytes() == before

    again = vram_project.record()
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(["vram baselines: 0 created, 0 updated, 1 unchanged, 0 unused"])
    again.stdout.re_match_lines([r"^test_mem\.py::test_a\s.*\s+unchanged$"])
    assert path.read_bytes() == before


def test_update_counts_an_updated_entry(vram_project) -> None:
    vram_project.record_then_check(ONE_TEST)
    vram_project.edit_entry("test_a", peak_factor=0.5)
    result = vram_project.record()
    result.stdout.fnmatch_lines(["vram baselines: 0 created, 1 updated, 0 unchanged, 0 unused"])
    assert vram_project.entry("test_a")["peak_bytes"] == max(
        vram_project.entry("test_a")["step_peak_bytes"]
    )


def test_entry_of_deleted_test_is_unused_then_removed_by_update(vram_project) -> None:
    vram_project.write(TWO_TESTS)
    vram_project.record()
    assert set(vram_project.baseline()["entries"]) == {"test_a", "test_b"}
    vram_project.write(ONE_TEST)  # test_b deleted from the module
    before = vram_project.baseline_path().read_bytes()

    result = vram_project.run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "1 unused vram baseline entries (remove with --vram-update):",
            f"  *baselines/host-cpu/test_mem.json: test_b / {LABEL}",
        ]
    )
    assert vram_project.baseline_path().read_bytes() == before  # kept on a normal run

    updated = vram_project.record()
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines(
        [
            "vram baselines: 0 created, 0 updated, 1 unchanged, 1 unused (removed)",
            "1 unused vram baseline entries (removed by this update):",
            f"  *baselines/host-cpu/test_mem.json: test_b / {LABEL}",
        ]
    )
    assert set(vram_project.baseline()["entries"]) == {"test_a"}
    assert "unused vram baseline entries" not in output(vram_project.run())


def test_deselected_test_is_not_unused(vram_project) -> None:
    vram_project.write(TWO_TESTS)
    vram_project.record()
    before = vram_project.baseline_path().read_bytes()

    result = vram_project.run("-k", "test_a")
    result.assert_outcomes(passed=1, deselected=1)
    assert "unused vram baseline entries" not in output(result)

    updated = vram_project.record("-k", "test_a")
    updated.assert_outcomes(passed=1, deselected=1)
    updated.stdout.fnmatch_lines(["vram baselines: 0 created, 0 updated, 1 unchanged, 0 unused"])
    assert vram_project.baseline_path().read_bytes() == before


def test_refresh_of_unchanged_entries_leaves_a_hand_formatted_file_alone(vram_project) -> None:
    vram_project.write(TWO_TESTS)
    vram_project.record()
    path = vram_project.baseline_path()
    path.write_text(json.dumps(json.loads(path.read_text("utf-8")), indent=4), "utf-8")
    before, content = path.stat(), path.read_bytes()

    for selection in ("test_b", "test_a or test_b"):
        result = vram_project.record("-k", selection)
        unchanged = selection.count("test_")
        result.stdout.fnmatch_lines(
            [f"vram baselines: 0 created, 0 updated, {unchanged} unchanged, 0 unused"]
        )
        after = path.stat()
        assert path.read_bytes() == content, output(result)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_refreshing_one_test_by_node_id_keeps_the_others(vram_project) -> None:
    """The hint ``pytest-vram refresh 'test_mem.py::test_a'`` selects by node id: test_b was
    not collected, but it is still in the module and its baseline must survive."""
    vram_project.write(TWO_TESTS)
    vram_project.record()

    result = vram_project.record("test_mem.py::test_a")
    result.assert_outcomes(passed=1)
    assert set(vram_project.baseline()["entries"]) == {"test_a", "test_b"}, output(result)
    result.stdout.fnmatch_lines(["vram baselines: 0 created, 0 updated, 1 unchanged, 0 unused"])


@pytest.mark.parametrize("update", [False, True], ids=["check", "update"])
def test_corrupt_baseline_fails_the_test_and_is_left_alone(vram_project, update) -> None:
    vram_project.write(ONE_TEST)
    path = vram_project.baseline_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"schema": 1, "entries": {oops\n')

    result = vram_project.run(*(["--vram-update"] if update else []))
    assert path.read_bytes() == b'{"schema": 1, "entries": {oops\n'
    text = output(result)
    assert "INTERNALERROR" not in text, text
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert f"baseline file {path} is not valid JSON" in text


@pytest.mark.parametrize("where", ["ini", "option"])
def test_baselines_folder_is_configurable(vram_project, where) -> None:
    if where == "ini":
        vram_project.ini(vram_baselines="memory/base")
        args: tuple[str, ...] = ()
    else:
        vram_project.ini(vram_baselines="ignored")  # the option wins over the ini
        args = ("--vram-baselines=memory/base",)
    recorded, checked = vram_project.record_then_check(ONE_TEST, *args)
    checked.assert_outcomes(passed=1)
    assert vram_project.baseline(folder="memory/base")["entries"]["test_a"][LABEL]
    assert not (vram_project.path / "baselines").exists()
    assert not (vram_project.path / "ignored").exists()


CLASS_AND_PARAMS = f"""
import pytest

class TestPair:
    @pytest.mark.vram_budget(gb=1, {SMALL})
    def test_a(self, vram):
        vram.step()

@pytest.mark.vram_budget(gb=1, {SMALL})
@pytest.mark.parametrize("method", ["full", "lora"])
def test_p(vram, method):
    vram.step(method=method)
"""


def test_refreshing_one_parametrized_case_keeps_class_and_sibling_entries(vram_project) -> None:
    """The module's full list of tests comes from collecting it afresh, classes included."""
    vram_project.write(CLASS_AND_PARAMS)
    vram_project.record()
    everything = {"TestPair::test_a", "test_p[full]", "test_p[lora]"}
    assert set(vram_project.baseline()["entries"]) == everything

    result = vram_project.record("test_mem.py::test_p[lora]")
    result.assert_outcomes(passed=1)
    assert set(vram_project.baseline()["entries"]) == everything, output(result)

    vram_project.write(CLASS_AND_PARAMS.replace('["full", "lora"]', '["full"]'))
    result = vram_project.record("test_mem.py::TestPair")
    result.stdout.fnmatch_lines(["vram baselines: 0 created, 0 updated, 1 unchanged, 1 unused*"])
    assert set(vram_project.baseline()["entries"]) == everything - {"test_p[lora]"}
