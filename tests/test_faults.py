"""Faults, with figures: each way a case can die fails that test only, says how it ended, lets
the session go on, and leaves no process behind.

Every fault runs in a pytester project whose test module has the faulty test followed by a
healthy one (the session went on). The case processes write their pids into the project's
``pids/`` folder; afterwards none of them may still run. A pid can be a zombie for a moment
(a case child is reaped by the forkserver, a rank or helper reparented to an init that may not
reap), so "gone" is: no /proc entry, or a zombie, within a few seconds.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import time

import pytest
from procs import assert_gone, group, running

from conftest import VramProject, output


@pytest.fixture(autouse=True)
def _whole_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vram table fits the terminal's width (test_summary_table.py): rows and notes whole."""
    monkeypatch.setenv("COLUMNS", "500")


# The case module: functions the child runs through vram.measure, and how they note their pids.
CASES = """
    import ctypes
    import os
    import resource
    import signal
    import time
    from pathlib import Path

    import pytest

    PIDS = Path(__file__).parent / "pids"


    def note_pid(name, pid=None):
        # Written whole (rename): the test may poll for the file while the case runs.
        PIDS.mkdir(exist_ok=True)
        tmp = PIDS / f".{name}.tmp"
        tmp.write_text(str(pid or os.getpid()))
        os.replace(tmp, PIDS / f"{name}.pid")


    def helper(name):
        # A process the case starts, left in the case's process group as a DataLoader
        # worker or a ZeRO rank is.
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(120)
            finally:
                os._exit(0)
        note_pid(name, pid)


    def fine():
        note_pid("fine")


    def aborts():
        note_pid("child")
        print("LAST WORDS before abort", flush=True)
        os.abort()


    def oom_killed():
        # The killer picks the case child; what it started must not outlive it.
        note_pid("child")
        helper("helper")
        print("LAST WORDS before SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


    def segfaults():
        note_pid("child")
        print("LAST WORDS before segfault", flush=True)
        ctypes.string_at(0)


    def hangs():
        note_pid("child")
        helper("helper")
        print("LAST WORDS before hanging", flush=True)
        time.sleep(120)


    def limit_address_space():
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, hard))  # 1 GiB cannot fit


    def exceeds_rlimit():
        import torch

        note_pid("child")
        limit_address_space()
        return torch.ones(2**30, dtype=torch.uint8)


    def raises_memory_error():
        note_pid("child")
        limit_address_space()
        return bytearray(2**30)


    def sleeps():
        note_pid("child")
        time.sleep(60)
"""


def module(*tests: str, extra: str = "") -> str:
    """The case functions plus one marked test per ``name:function`` pair, in that order."""
    body = [CASES, extra]
    for spec in tests:
        name, fn = spec.split(":")
        body.append(
            f"\n\n    @pytest.mark.vram_budget(gb=2)\n    def {name}(vram):\n"
            f"        vram.measure({fn})\n"
        )
    return "".join(body)


def pids(project: VramProject) -> dict[str, int]:
    folder = project.path / "pids"
    return {p.stem: int(p.read_text()) for p in folder.glob("*.pid")} if folder.is_dir() else {}


def assert_fault(
    project: VramProject, result: pytest.RunResult, test: str, first_line: str, *tail: str
) -> None:
    """``test`` failed with ``first_line`` (an fnmatch pattern) followed by ``tail``, the test
    after it passed, and no process the case started still runs."""
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([first_line, *tail])
    result.stdout.fnmatch_lines([f"FAILED test_mem.py::{test} - *"])
    assert "INTERNALERROR" not in output(result)
    named = pids(project)
    assert "child" in named and "fine" in named, named  # the fault ran, and then the next test
    assert_gone(named)


# -- crashes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "first_line", "words"),
    [
        ("aborts", "case killed by SIGABRT [[]test_mem.aborts]", "before abort"),
        (
            "oom_killed",
            "case killed by SIGKILL (the OS out-of-memory killer sends this) "
            "[[]test_mem.oom_killed]",
            "before SIGKILL",
        ),
        ("segfaults", "case killed by SIGSEGV [[]test_mem.segfaults]", "before segfault"),
    ],
    ids=["abort", "sigkill", "segfault"],
)
def test_crash_fails_its_test_and_leaves_nothing(
    vram_project: VramProject, fn: str, first_line: str, words: str
) -> None:
    vram_project.write(module(f"test_fault:{fn}", "test_after:fine"))
    result = vram_project.run("--vram-update")
    assert_fault(
        vram_project,
        result,
        "test_fault",
        first_line,
        "--- tail of the case's output ---",
        f"LAST WORDS {words}",
    )


def test_hang_is_killed_with_its_process_group(vram_project: VramProject) -> None:
    vram_project.write(module("test_fault:hangs", "test_after:fine"))
    result = vram_project.run("--vram-update", "--vram-timeout", "5")
    assert_fault(
        vram_project,
        result,
        "test_fault",
        "timed out after 5 s (--vram-timeout), killed [[]test_mem.hangs]",
        "--- tail of the case's output ---",
        "LAST WORDS before hanging",
    )
    assert result.duration < 30, "the hanging case was not killed at its timeout"
    child = pids(vram_project)["child"]
    assert not group(child), "members of the case's process group outlived its timeout"


# Which allocator fails: torch's raises a RuntimeError, Python's a MemoryError.
ALLOCATORS = {"torch": ("exceeds_rlimit", "RuntimeError: *can't allocate memory*")}
ALLOCATORS["python"] = ("raises_memory_error", "MemoryError*")


@pytest.mark.parametrize(("fn", "error"), ALLOCATORS.values(), ids=ALLOCATORS)
def test_memory_error_under_a_limit_is_out_of_memory(
    vram_project: VramProject, fn: str, error: str
) -> None:
    vram_project.write(module(f"test_fault:{fn}", "test_after:fine"))
    result = vram_project.run("--vram-update")
    assert_fault(vram_project, result, "test_fault", f"out of memory: {error}[[]test_mem.{fn}]")


# -- a ZeRO rank dies while its peer waits in a collective ---------------------------------

# Imported by every case's child (on the host meter before it forks the ranks): rank 1 is
# killed as the OS out-of-memory killer would kill it, at the start of its backward pass, while
# rank 0 goes on into the backward's gradient reduction, where it waits for rank 1.
RANK_DIES = """
import os
import signal
import time
from pathlib import Path

from deepspeed.runtime.engine import DeepSpeedEngine

PIDS = Path(__file__).parent / "pids"
PIDS.mkdir(exist_ok=True)
(PIDS / f"case-{os.getpid()}.pid").write_text(str(os.getpid()))
_backward = DeepSpeedEngine.backward


def backward(self, *args, **kwargs):
    rank = os.environ["RANK"]
    (PIDS / f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == "1":
        # Rank 0 must be in backward (where its collective waits for rank 1) when rank 1 dies;
        # dying first would let the case kill rank 0 while it is still in its forward.
        deadline = time.monotonic() + 60
        while not (PIDS / "rank0.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return _backward(self, *args, **kwargs)


DeepSpeedEngine.backward = backward
"""

ZERO_CASE = """

    @pytest.mark.vram_budget(gb=2)
    def test_fault(vram):
        vram.step(model="tiny-llama", batch=1, seq=32, zero=2, ranks=2)
"""


def test_zero_rank_killed_fails_the_case_naming_it(vram_project: VramProject) -> None:
    pytest.importorskip("deepspeed", reason="ZeRO cases need pytest-vram[zero]")
    vram_project.pytester.makepyfile(rank_dies=RANK_DIES)
    vram_project.write(module("test_after:fine", extra=ZERO_CASE))
    # The case takes 25-45 s on a 2-core machine, over 120 s when other jobs load it. CI builds
    # DeepSpeed's shm op first (.ci/run: pytest-vram build-ops); a first build (50 s) fits too.
    timeout = 300
    result = vram_project.run(
        "--vram-update", "--vram-import", "rank_dies", "--vram-timeout", str(timeout)
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "RuntimeError: rank 1 of 2 was killed by SIGKILL (the OS out-of-memory killer sends "
            "this) before sending a result "
            "[[]tiny-llama full adamw bf16 b1 s32 zero2 r2]"
        ]
    )
    assert result.duration < timeout, "rank 0 waited in its collective until the timeout"
    named = pids(vram_project)
    assert {"rank0", "rank1", "fine"} <= set(named), named  # both ranks reached backward
    assert len([n for n in named if n.startswith("case-")]) == 2, named
    assert_gone(named)


# -- the worker server dies --------------------------------------------------------------

SERVER_DIES = """

    def kill_server():
        # The forkserver is this case child's parent.
        note_pid("child")
        note_pid("server", os.getppid())
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(1)  # the worker sees the server's pipe close first
"""

KILL_SERVER = """

    import multiprocessing.forkserver


    def test_kill_server():
        # Private, but the only record of the server's pid that multiprocessing keeps; the
        # in-process run shares it with the outer pytest process, whose server this is.
        pid = multiprocessing.forkserver._forkserver._forkserver_pid
        note_pid("server", pid)
        # No wait for it to die: the next case starts while the server may still look alive.
        os.kill(pid, signal.SIGKILL)
"""


def test_server_killed_between_cases_is_restarted(vram_project: VramProject) -> None:
    vram_project.write(
        module("test_before:fine")
        + KILL_SERVER
        + "\n\n    @pytest.mark.vram_budget(gb=2)\n    def test_after(vram):\n"
        "        vram.measure(fine)\n"
    )
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=3)
    old = pids(vram_project)["server"]
    assert_gone({"server": old})
    # multiprocessing started a new server, with the same preload (set_forkserver_preload is
    # process-wide), for test_after.
    new = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert new != old and running(new)


def test_server_killed_during_a_case_keeps_its_result(vram_project: VramProject) -> None:
    vram_project.write(module("test_during:kill_server", "test_after:fine", extra=SERVER_DIES))
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines(
        [r"^test_mem\.py::test_during\s+test_mem\.kill_server\s+host\s+0\.000"]
    )
    assert_gone(pids(vram_project))


# -- Ctrl-C during a case ------------------------------------------------------------------


def test_ctrl_c_during_a_case_ends_the_run_and_the_case(vram_project: VramProject) -> None:
    vram_project.write(module("test_seed:fine", "test_sleep:sleeps"))
    vram_project.record("-k", "test_seed")  # a valid baselines file the interrupted run may keep
    baselines = vram_project.baseline_path()
    before = baselines.read_bytes()
    # pytester.popen rather than runpytest_subprocess, which returns only when the run ends.
    # Its own session: the SIGINT goes to the run's foreground group, as a terminal's Ctrl-C.
    proc = vram_project.pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--vram-update"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        # A terminal's run takes Ctrl-C; a run started as a background job inherits SIGINT
        # ignored (POSIX shells without job control), and Python then never raises on it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child = vram_project.path / "pids" / "child.pid"
    try:
        deadline = time.monotonic() + 120
        while not child.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the case did not start"
            time.sleep(0.1)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out
    assert "KeyboardInterrupt" in out, out
    assert took < 10, f"pytest took {took:.1f} s to stop"
    assert_gone(pids(vram_project))
    assert not baselines.exists() or baselines.read_bytes() == before
    assert not list(baselines.parent.glob(".*.tmp")), "a half-written baseline file was left"
