"""Writers of one baseline file at the same time: separate pytest processes, each with xdist
workers, and bare ``BaselineStore.write`` calls. No entry may be lost, and the file must be
valid JSON whenever anyone reads it (the test reads it every 10 ms while they run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CASES = 3  # parametrized cases per test
MODULE = "import pytest\n\n\ndef touch(n):  # the cheapest case a child can measure\n    return n\n"
MODULE += "".join(
    f"\n\n@pytest.mark.parametrize('n', range({CASES}))\ndef test_{name}(vram, n):\n"
    "    vram.measure(touch, n)\n"
    for name in ("alpha", "bravo", "charlie", "delta")
)


@dataclass
class Poll:
    """What the test saw of the file while the writers ran."""

    reads: int = 0  # successful reads, each parsed as JSON
    absent: int = 0  # reads before the first writer created the file
    versions: set[str] = field(default_factory=set)  # distinct contents seen


def _env() -> dict[str, str]:
    # An outer xdist run sets PYTEST_XDIST_WORKER and friends: the inner runs start afresh.
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def _poll_while(procs: Sequence[subprocess.Popen[str]], path: Path, timeout_s: float) -> Poll:
    poll = Poll()
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not finish"
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            poll.absent += 1
        else:
            json.loads(text)  # a half-written or merged-badly file raises here
            poll.reads += 1
            poll.versions.add(text)
        time.sleep(0.01)
    return poll


# The inner project's conftest: each xdist worker, once its tests ran, waits at the end of its
# session until every worker of both sessions is there, so their baseline writes (the plugin's
# own pytest_sessionfinish, after this tryfirst one) start within a few milliseconds of each
# other. Without it the two sessions finish seconds apart and write one after the other: the
# test passed with the lock removed. A ready file holds how many tests its worker ran.
BARRIER = """
import os
import time
from pathlib import Path

import pytest

BARRIER = Path(__file__).parent / "barrier"
WRITERS = {writers}
ran = 0


def pytest_runtest_call(item):
    global ran
    ran += 1


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller writes no baselines
        return
    BARRIER.mkdir(exist_ok=True)
    tmp = BARRIER / f".{{os.getpid()}}.tmp"
    tmp.write_text(str(ran))
    os.replace(tmp, BARRIER / f"ready-{{os.getpid()}}")
    deadline = time.monotonic() + 300
    while len(list(BARRIER.glob("ready-*"))) < WRITERS:
        if time.monotonic() > deadline:
            (BARRIER / f"late-{{os.getpid()}}").touch()
            return
        time.sleep(0.001)
"""


def test_two_refreshing_sessions_with_xdist_lose_no_entry(tmp_path: Path) -> None:
    sessions, workers = 2, 2
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_mem.py").write_text(MODULE)
    (tmp_path / "conftest.py").write_text(BARRIER.format(writers=sessions * workers))
    path = tmp_path / "baselines" / "host-cpu" / "test_mem.json"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", str(workers)]
    command += ["--vram-update", "-q", "-k"]
    procs = [
        subprocess.Popen(
            [*command, selection],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for selection in ("alpha or bravo", "charlie or delta")
    ]
    poll = _poll_while(procs, path, timeout_s=600)
    outputs = [p.communicate()[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert f"{2 * CASES} passed" in out, out  # xdist does not count the deselected
        assert f"vram baselines: {2 * CASES} created, 0 updated, 0 unchanged, 0 unused" in out

    barrier = tmp_path / "barrier"
    assert not list(barrier.glob("late-*")), "a worker waited in vain: the writes did not race"
    ran = sorted(int(p.read_text()) for p in barrier.glob("ready-*"))
    assert len(ran) == sessions * workers and sum(ran) == 4 * CASES, ran
    assert all(ran), f"a worker ran no test, so it had nothing to write: {ran}"
    entries = json.loads(path.read_text("utf-8"))["entries"]
    expected = {
        f"test_{name}[{n}]" for name in ("alpha", "bravo", "charlie", "delta") for n in range(CASES)
    }
    assert set(entries) == expected, f"lost: {sorted(expected - set(entries))}"
    # the argument is part of each call's label
    assert all(list(cases) == [f"test_mem.touch({t[-2]})"] for t, cases in entries.items())
    assert poll.reads > 0, "the file was never seen while the writers ran"
    print(
        f"\n{len(expected)} entries written by {sessions} sessions x {workers} workers at once "
        f"(tests per worker: {ran}), {len(entries)} found; {poll.reads} reads parsed "
        f"({len(poll.versions)} distinct contents), {poll.absent} before the file existed"
    )


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_vram.baselines import BaselineStore
    from pytest_vram.result import Breakdown, MemoryResult

    root, go, who, count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    result = MemoryResult("case", "host", "host-cpu", 1, (1,), Breakdown(activation_bytes=1))
    store = BaselineStore(root, "host-cpu")
    while not go.exists():  # start together
        time.sleep(0.001)
    for i in range(count):
        store.write("test_mem.py", {f"test_{who}_{i}": {"case": result.to_dict()}}, {})
    """
)


def test_many_writers_of_one_file_lose_no_entry(tmp_path: Path) -> None:
    """Bare writes, many and at once: without a shared lock some merge into a stale copy. Each
    writer has a TMPDIR of its own, as separate CI steps or tox envs may: the lock must not
    live there."""
    writers, count = 4, 25
    root, go = tmp_path / "baselines", tmp_path / "go"
    tmpdirs = [tmp_path / f"tmp{w}" for w in range(writers)]
    for folder in tmpdirs:
        folder.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(go), f"w{w}", str(count)],
            env=_env() | {"TMPDIR": str(tmpdirs[w])},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in range(writers)
    ]
    time.sleep(1.0)  # let every writer import and wait
    go.touch()
    path = root / "host-cpu" / "test_mem.json"
    poll = _poll_while(procs, path, timeout_s=120)
    for proc in procs:
        out = proc.communicate()[0]
        assert proc.returncode == 0, out
    entries = json.loads(path.read_text("utf-8"))["entries"]
    assert set(entries) == {f"test_w{w}_{i}" for w in range(writers) for i in range(count)}
    print(
        f"\n{writers * count} entries written by {writers} processes, {len(entries)} found; "
        f"{poll.reads} reads parsed ({len(poll.versions)} distinct contents)"
    )
