"""xdist workers reuse each other's cases: a spec one worker measured is not measured again by
another worker of the same run (``pytest_vram.shared_results``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import SMALL, output
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.result import MemoryResult
from pytest_vram.shared_results import Key, SharedResults
from pytest_vram.spec import StepSpec
from pytest_vram.step import run_step


@pytest.fixture(scope="module")
def measured() -> MemoryResult:
    spec = StepSpec(model="tiny-llama", batch=1, seq=32)
    return dataclasses.replace(run_step(spec, FakeMeter()), snapshot_path="/gone/snapshot.pickle")


def key(meter: str = "fake") -> Key:
    return (meter, StepSpec(model="tiny-llama", batch=1, seq=32).to_json(), ())


def test_a_stored_result_reads_back_equal_without_its_snapshot(
    tmp_path: Path, measured: MemoryResult
) -> None:
    shared = SharedResults(tmp_path)
    assert shared.get(key()) is None
    shared.put(key(), measured)
    back = shared.get(key())
    # The snapshot file is the measuring worker's to keep or drop.
    assert back == dataclasses.replace(measured, snapshot_path=None)
    assert [p.suffix for p in tmp_path.iterdir()] == [".pickle"]  # no temporary left behind
    assert shared.get(key("host")) is None  # another meter's case is another case


def test_gpu_results_stay_in_their_worker(tmp_path: Path, measured: MemoryResult) -> None:
    shared = SharedResults(tmp_path)
    shared.put(key("cuda"), measured)
    assert list(tmp_path.iterdir()) == []
    assert shared.get(key("cuda")) is None


def test_an_unreadable_file_is_measured_again(tmp_path: Path, measured: MemoryResult) -> None:
    shared = SharedResults(tmp_path)
    shared.put(key(), measured)
    (stored,) = tmp_path.iterdir()
    whole = stored.read_bytes()
    for damaged in (b"\x80\x05not a pickle", whole[: len(whole) // 2], b""):
        stored.write_bytes(damaged)
        assert shared.get(key()) is None
    shared.put(key(), measured)  # replaced whole
    assert shared.get(key()) is not None


def test_a_vanished_folder_stores_nothing_and_fails_nothing(
    tmp_path: Path, measured: MemoryResult
) -> None:
    shared = SharedResults(tmp_path / "removed")
    shared.put(key(), measured)
    assert shared.get(key()) is None


# Each case child imports COUNT, which appends a line per measurement. test_b waits for
# test_a's result (on the other worker under --dist loadfile), then asks for the same spec and
# for another one.
COUNT = """
import os
with open(os.environ["VRAM_TEST_COUNT"], "a") as out:
    out.write(os.environ.get("PYTEST_XDIST_WORKER", "master") + "\\n")
"""
FIRST = f"""
import json, os
import pytest

@pytest.mark.vram_budget(gb=1, {SMALL})
def test_a(vram):
    peak = None
    try:
        peak = vram.step().peak_bytes
    finally:  # test_b waits for this file
        done = {{"worker": os.environ["PYTEST_XDIST_WORKER"], "peak": peak}}
        with open(os.environ["VRAM_TEST_DONE"], "w") as out:
            json.dump(done, out)
"""
SECOND = f"""
import glob, json, os, time
import pytest
from pytest_vram.shared_results import WORKER_INPUT

@pytest.mark.vram_budget(gb=1, {SMALL})
def test_b(vram, request):
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["VRAM_TEST_DONE"]):
        assert time.monotonic() < deadline, "test_a never finished"
        time.sleep(0.2)
    with open(os.environ["VRAM_TEST_DONE"]) as done:
        first = json.load(done)
    assert first["worker"] != os.environ["PYTEST_XDIST_WORKER"] and first["peak"]
    folder = request.config.workerinput[WORKER_INPUT]
    assert glob.glob(os.path.join(folder, "*.pickle"))
    with open(os.environ["VRAM_TEST_FOLDER"], "w") as out:
        out.write(folder)
    assert vram.step().peak_bytes == first["peak"]
    vram.step(method="lora")
"""


def test_a_case_one_worker_measured_is_reused_by_the_other(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_first=FIRST, test_second=SECOND, vram_count=COUNT)
    count, done = pytester.path / "count.txt", pytester.path / "done.json"
    monkeypatch.setenv("VRAM_TEST_COUNT", str(count))
    monkeypatch.setenv("VRAM_TEST_DONE", str(done))
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    folder = pytester.path / "folder.txt"
    monkeypatch.setenv("VRAM_TEST_FOLDER", str(folder))
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        "--dist",
        "loadfile",
        "--vram-update",
        "--vram-import",
        "vram_count",
    )
    assert result.ret == 0, output(result)
    first = json.loads(done.read_text())["worker"]
    other = {"gw0": "gw1", "gw1": "gw0"}[first]
    # test_a's case on its worker; test_b's other spec on the other; the shared one not again.
    assert sorted(count.read_text().split()) == sorted([first, other]), output(result)
    assert not Path(folder.read_text()).exists()  # removed with the run
