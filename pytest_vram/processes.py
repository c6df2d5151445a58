"""Child processes that report through a pipe: fork, receive, reap, kill, and how one ended.

Shared by the worker (a case child, forked by multiprocessing's forkserver) and ZeRO's ranks
(forked from the case child with ``os.fork``). Torch-free: the pytest process reads the same
exit-status text the case child writes about its ranks. Exit codes follow multiprocessing's
convention: ``N >= 0`` exited with N, ``-N`` killed by signal N, None not ended yet.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "TAIL_HEADER",
    "exit_text",
    "fork",
    "kill",
    "kill_group",
    "output_tail",
    "reap",
    "receive",
    "running",
    "share_cores",
    "threads_per_process",
]

TAIL_HEADER: Final = "--- tail of the case's output ---"
# SIGKILL is what a user sees when the kernel ran out of memory; nothing else in the text says so.
_OOM_KILLER: Final = " (the OS out-of-memory killer sends this)"
_TAIL_BYTES: Final = 64 * 1024  # enough for any number of lines a report shows


def exit_text(code: int | None) -> str:
    """How a process ended: ``killed by SIGKILL (the OS out-of-memory killer sends this)``,
    ``killed by SIGSEGV``, ``exited with code 3``, or ``did not exit`` for None."""
    if code is None:
        return "did not exit"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"
    return f"killed by {name}{_OOM_KILLER if -code == signal.SIGKILL else ''}"


def fork(
    target: Callable[[multiprocessing.connection.Connection], None],
) -> tuple[int, multiprocessing.connection.Connection]:
    """Fork a child that runs ``target`` with the sending end of a pipe, then exits at once
    (status 0, or 1 when ``target`` raised); the child's pid and the receiving end.

    Plain ``os.fork``, which a daemon process may call (multiprocessing forbids it children).
    The child ends in ``os._exit`` and never returns into the caller's code, whose ``finally``
    blocks and atexit hooks are the parent's. ``target`` sends what it has to report itself."""
    recv, send = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        recv.close()
        code = 0
        try:
            target(send)
        except BaseException:  # noqa: B036 - the child ends here, whatever happened
            code = 1
        finally:
            os._exit(code)
    send.close()
    return pid, recv


def receive(conn: multiprocessing.connection.Connection) -> Any | None:
    """The one message a child sends, or None when it ended (or died sending) without one."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def reap(pid: int) -> int:
    """Wait for the forked child ``pid`` to end; its exit code (``-N``: killed by signal N)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill(pid: int) -> None:
    """SIGKILL one child of ours, not reaped yet, so the pid is still its own."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_group(pid: int | None, leader_gone: bool = False) -> None:
    """SIGKILL the process group led by ``pid`` (a child that called ``os.setpgid(0, 0)``), or
    ``pid`` alone when it has no group yet. With ``leader_gone`` (the child has exited) only the
    group: Linux does not hand out a pid as a new process's while a group still holds it as its
    id, but once the group is empty the number may be anyone's, so no kill by pid then."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if leader_gone:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def running(pid: int | None) -> bool:
    """Whether ``pid`` still exists (a zombie counts): ours, so not another user's."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def output_tail(path: str, lines: int) -> str:
    """The last ``lines`` lines of a child's output file; "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            text = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def threads_per_process(cpus: int, processes: int) -> int:
    """torch's intra-op threads for each of ``processes`` running at once on ``cpus`` cores.
    torch's default, a thread per core in every process, oversubscribes the cores when ZeRO
    ranks or xdist workers run side by side, and its spinning threads then wait on each other.
    What a step allocates does not depend on it: tensor sizes are the same on any count."""
    return max(1, cpus // max(1, processes))


def share_cores(processes: int) -> None:
    """Give torch in this process its share of the cores it may use, when ``processes`` run
    at once; a count the user set (OMP_NUM_THREADS) is left alone."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(threads_per_process(len(os.sched_getaffinity(0)), processes))
