"""The process helpers of the worker and ZeRO's ranks, on real forked processes."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from procs import group
from procs import running as alive  # a zombie is not alive

from pytest_vram import processes

OOM_KILLER = "killed by SIGKILL (the OS out-of-memory killer sends this)"


def _sleeper(send: Connection) -> None:
    time.sleep(60)


def _gone(pgid: int, within_s: float = 5.0) -> bool:
    """Whether the group ``pgid`` has no live member within ``within_s``."""
    deadline = time.monotonic() + within_s
    while group(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not group(pgid)


# -- how a process ended -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (None, "did not exit"),
        (0, "exited with code 0"),
        (3, "exited with code 3"),
        (-signal.SIGKILL, OOM_KILLER),
        (-signal.SIGABRT, "killed by SIGABRT"),
        (-signal.SIGSEGV, "killed by SIGSEGV"),
        (-(signal.SIGRTMIN + 1), f"killed by signal {signal.SIGRTMIN + 1}"),
    ],
)
def test_exit_text(code: int | None, text: str) -> None:
    assert processes.exit_text(code) == text


# -- fork, receive, reap -------------------------------------------------------------------


def test_a_forked_child_sends_its_message_and_exits_zero() -> None:
    pid, conn = processes.fork(lambda send: send.send(("ok", os.getpid())))
    assert processes.receive(conn) == ("ok", pid)
    assert processes.reap(pid) == 0
    conn.close()


def test_a_child_that_raises_exits_one_without_a_message() -> None:
    def fails(send: Connection) -> None:
        raise RuntimeError("the body failed")

    pid, conn = processes.fork(fails)
    assert processes.receive(conn) is None
    code = processes.reap(pid)
    assert (code, processes.exit_text(code)) == (1, "exited with code 1")
    conn.close()


def test_a_child_killed_before_sending_is_named_by_its_signal() -> None:
    pid, conn = processes.fork(lambda send: os.kill(os.getpid(), signal.SIGKILL))
    assert processes.receive(conn) is None
    assert processes.exit_text(processes.reap(pid)) == OOM_KILLER
    conn.close()


def test_the_child_never_returns_into_the_callers_code(tmp_path: Path) -> None:
    # A child that returned would run the rest of this test, then pytest, a second time.
    came_back = tmp_path / "came-back"
    parent = os.getpid()
    pid, conn = processes.fork(lambda send: None)
    if os.getpid() != parent:
        came_back.write_text(str(os.getpid()))
        os._exit(0)
    assert processes.reap(pid) == 0
    assert not came_back.exists()
    conn.close()


# -- kill ----------------------------------------------------------------------------------


def test_kill_ends_a_running_child_and_accepts_an_exited_one() -> None:
    pid, conn = processes.fork(_sleeper)
    assert processes.running(pid)
    processes.kill(pid)
    assert processes.reap(pid) == -signal.SIGKILL
    conn.close()
    pid, conn = processes.fork(lambda send: None)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes.running(pid), "a zombie until reaped"
    processes.kill(pid)  # nothing left to kill, and no error
    assert processes.reap(pid) == 0
    assert not processes.running(pid)
    assert not processes.running(None)
    conn.close()


def _group_with_a_helper(send: Connection) -> None:
    """Leads its own group, as the case child does, and starts a helper in it."""
    os.setpgid(0, 0)
    helper = os.fork()
    if helper == 0:
        time.sleep(60)
        os._exit(0)
    send.send(helper)
    time.sleep(60)


def test_kill_group_ends_the_leader_and_what_it_started() -> None:
    pid, conn = processes.fork(_group_with_a_helper)
    helper = processes.receive(conn)
    assert isinstance(helper, int) and os.getpgid(helper) == pid
    processes.kill_group(pid)
    assert processes.reap(pid) == -signal.SIGKILL
    assert _gone(pid), "the helper outlived its group's leader"
    conn.close()


def test_kill_group_after_the_leader_ends_the_rest_of_its_group() -> None:
    pid, conn = processes.fork(_group_with_a_helper)
    helper = processes.receive(conn)
    assert isinstance(helper, int)
    os.kill(pid, signal.SIGKILL)  # the leader dies alone, as under the OS OOM killer
    assert processes.reap(pid) == -signal.SIGKILL
    assert group(pid) == [helper]
    processes.kill_group(pid, leader_gone=True)
    assert _gone(pid)
    conn.close()


def test_kill_group_of_a_child_without_a_group_kills_it_unless_it_is_gone() -> None:
    # No group carries this pid: with leader_gone the number may be anyone's, so it is spared.
    pid, conn = processes.fork(_sleeper)
    processes.kill_group(pid, leader_gone=True)
    time.sleep(0.1)
    assert processes.running(pid) and os.waitpid(pid, os.WNOHANG) == (0, 0)
    processes.kill_group(pid)
    assert processes.reap(pid) == -signal.SIGKILL
    processes.kill_group(None)
    conn.close()


# -- the tail of a child's output ----------------------------------------------------------


def test_output_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "case.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(100)) + b"bad \xff byte\n")
    tail = processes.output_tail(str(log), 3)
    assert tail == "line 98\nline 99\nbad \ufffd byte"


def test_output_tail_of_a_long_output_reads_its_end_only(tmp_path: Path) -> None:
    log = tmp_path / "case.log"
    log.write_text("x" * 10**6 + "\nlast words\n")
    assert processes.output_tail(str(log), 20).endswith("\nlast words")
    assert len(processes.output_tail(str(log), 20)) <= 64 * 1024


def test_output_tail_of_no_file_is_empty(tmp_path: Path) -> None:
    assert processes.output_tail(str(tmp_path / "missing.log"), 20) == ""
