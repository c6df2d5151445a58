"""Isolation: every case runs in a fresh child forked from a server that imported torch once.

The server is multiprocessing's forkserver with the libraries preloaded (``preload``): it is
started from the pytest process before anything touches CUDA, and each case is a new fork of it,
so peaks start clean and a crash, an out-of-memory error or a hang ends one case, not the
session. The child reports through a pipe with an explicit message; the parent turns silence
into a ``CaseFailure`` from the exit code or signal and the tail of the child's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, Literal, final

from pytest_vram import processes
from pytest_vram.calls import call_label
from pytest_vram.errors import SpecError, is_oom
from pytest_vram.preload import RANK_PARENT_MODULES, SERVER_ENV, preload_modules
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec

__all__ = ["RANK_PARENT_MODULES", "CaseFailure", "Job", "Worker", "preload_modules"]

HUB_OFFLINE: Final = "HF_HUB_OFFLINE"


_TAIL_LINES: Final = 20
# After the child has sent its result it only has to exit; do not wait long for that.
_EXIT_GRACE_S: Final = 30.0
_START_ATTEMPTS: Final = 5  # a server that died is gone within a few tries

FailureKind = Literal["crash", "timeout", "oom", "error", "spec", "unsupported"]


@final
@dataclasses.dataclass(frozen=True)
class Job:
    """One case: a StepSpec, or an importable function with its arguments (``ranks``: run it on
    that many ranks with torchrun's environment).

    The function and its arguments travel pickled, as bytes: the user's module is imported
    where the call is unpickled, after the fork that needs it (a GPU rank), not before."""

    meter: str
    spec: StepSpec | None = None
    meter_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Modules that register methods/optimizers (pytest_vram.methods.register): imported first.
    imports: tuple[str, ...] = ()
    ranks: int | None = None

    @property
    def label(self) -> str:
        if self.spec is not None:
            return self.spec.label
        sent: str | None = self.__dict__.get("_label")
        if sent is not None:
            return sent
        assert self.fn is not None
        return call_label(self.fn, self.args, self.kwargs, self.ranks)

    def check_picklable(self) -> None:
        """A local function or lambda cannot reach the child; say so before forking."""
        try:
            self.call  # noqa: B018 - pickled once, here, and sent as it is
        except Exception as exc:
            raise SpecError(
                f"vram.measure needs an importable module-level function and picklable "
                f"arguments; {self.label} cannot be sent to the worker: {exc}"
            ) from None

    @functools.cached_property
    def call(self) -> bytes | None:
        """The pickled ``(fn, args, kwargs)``, unpickled by ``user_step.measure_call`` where it
        runs (cached in the instance, so it travels as these bytes)."""
        return pickle.dumps((self.fn, self.args, self.kwargs)) if self.fn is not None else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.fn is not None:
            state.update(fn=None, args=(), kwargs={}, _label=self.label, call=self.call)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # frozen: no __setattr__


@final
@dataclasses.dataclass(frozen=True)
class CaseFailure:
    """A case that produced no result: what happened, in one line, plus what is known."""

    label: str
    kind: FailureKind
    reason: str
    exitcode: int | None = None
    output_tail: str = ""
    traceback: str = ""

    def long_repr(self) -> str:
        parts = [f"{self.reason} [{self.label}]"]
        if self.traceback:
            parts.append(self.traceback.rstrip())
        if self.output_tail:
            parts.append(f"{processes.TAIL_HEADER}\n{self.output_tail.rstrip()}")
        return "\n".join(parts)


def _share_cores(job: Job) -> None:
    """Leave a count the user set (OMP_NUM_THREADS) alone; else share the cores this
    process may use among the case's ranks and the session's xdist workers."""
    ranks = job.spec.ranks if job.spec is not None else (job.ranks or 1)
    processes.share_cores(ranks * int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


def _execute(job: Job) -> MemoryResult:
    import importlib

    from pytest_vram.meters import make_meter
    from pytest_vram.step import run_step
    from pytest_vram.user_step import measure_call, measure_ranks
    from pytest_vram.zero import ops

    on_gpu = job.meter == "cuda"
    if on_gpu:
        from pytest_vram import forksafe

        forksafe.arm()  # a case child may fork ranks: remember who touches CUDA before that
        forksafe.check_fork("this case's child process")
    # DeepSpeed picks its accelerator once, at import, from DS_ACCELERATOR: whatever the user
    # exported, the host meter's ranks must get the CPU one and the cuda meter's CUDA.
    ops.set_accelerator(on_gpu)
    ops.use_ninja_beside_python()  # the ninja build-ops used, or the ops rebuild (ranks inherit)
    for module in preload_modules(job.meter):
        # A host case in the cuda server imports peft here. The libraries are optional extras:
        # a missing one is skipped, as the forkserver skips it.
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(module)
    # A case that forks ranks imports the user's modules (and unpickles the user's function) in
    # each rank, after the fork: on a GPU, one that imports DeepSpeed or bitsandbytes would
    # initialise CUDA in the ranks' parent.
    zero_ranks = on_gpu and job.spec is not None and job.spec.zero is not None
    forks = zero_ranks or job.ranks is not None
    if on_gpu and not forks:
        from pytest_vram import forksafe

        forksafe.disarm()  # nothing forks from here: the step runs on torch's own probes
    for module in () if forks else job.imports:
        importlib.import_module(module)

    _share_cores(job)
    meter = make_meter(job.meter, **job.meter_options)
    if job.spec is not None:
        return run_step(job.spec, meter, rank_imports=job.imports if forks else ())
    call = job.call
    assert call is not None
    if job.ranks is not None:
        return measure_ranks(call, job.label, meter, job.ranks, job.imports)
    return measure_call(call, job.label, meter)


def _kind(exc: BaseException) -> FailureKind:
    from pytest_vram.errors import Unsupported

    if is_oom(exc):
        return "oom"
    if isinstance(exc, SpecError):
        return "spec"
    if isinstance(exc, Unsupported):
        return "unsupported"
    return "error"


def _child(job: Job, conn: multiprocessing.connection.Connection, output_path: str) -> None:
    # Own process group: a timeout kills whatever the case started too.
    os.setpgid(0, 0)
    fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from pytest_vram import quiet  # libraries' import chatter out of the case's output tail

    quiet.install()
    try:
        message: tuple[str, ...] = ("ok", _execute(job).to_json())
    except BaseException as exc:  # noqa: B036 - every way out becomes a message
        kind = _kind(exc)
        what = str(exc) if kind in ("spec", "unsupported") else f"{type(exc).__name__}: {exc}"
        message = (kind, what, traceback.format_exc())
    conn.send(message)
    conn.close()


def _tail(path: str) -> str:
    return processes.output_tail(path, _TAIL_LINES)


def _crash_reason(code: int | None) -> str:
    ended = processes.exit_text(code)
    if code is not None and code >= 0:  # a signal says what happened; an exit code does not
        return f"case {ended} before sending a result"
    return f"case {ended}"


_server_meter: str | None = None  # the meter the running forkserver was preloaded for


def _start_server(meter: str) -> str:
    """Start multiprocessing's forkserver (one per process) for ``meter``; the meter it serves.

    The cuda server gets its variables for its own life only: set in this process they would
    reach pytester's subprocesses and arm the probes there at collection."""
    global _server_meter
    if _server_meter is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload_modules(meter)))
        env = dict(SERVER_ENV[meter])
        # Cases build models from configs and never download; huggingface_hub reads this once,
        # at import, so it is set for the server. A user who exported it keeps their value.
        env.setdefault(HUB_OFFLINE, os.environ.get(HUB_OFFLINE, "1"))
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        _server_meter = meter
    return _server_meter


@final
class Worker:
    """Runs jobs in forked children of a preloaded forkserver; one per pytest process.

    ``meter`` is the session's meter: "cuda" preloads only what leaves fork usable. Host and
    fake cases run in either server; a cuda case needs the cuda server."""

    def __init__(self, meter: str = "host") -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self.meter = _start_server(meter)

    def run(self, job: Job, timeout_s: float) -> MemoryResult | CaseFailure:
        if job.fn is not None:
            job.check_picklable()
        if job.meter == "cuda" and self.meter != "cuda":
            return CaseFailure(
                job.label,
                "spec",
                f"a cuda case cannot run in this session's worker, which serves the {self.meter} "
                "meter and preloads libraries that initialise CUDA; run with --gpu (or "
                "--vram-device cuda), or mark the test with device='cuda'",
            )
        fd, output_path = tempfile.mkstemp(prefix="pytest-vram-case-", suffix=".log")
        os.close(fd)
        try:
            return self._run(job, timeout_s, output_path)
        finally:
            os.unlink(output_path)

    def _run(self, job: Job, timeout_s: float, output_path: str) -> MemoryResult | CaseFailure:
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child, args=(job, send, output_path), daemon=True)
        for attempt in range(_START_ATTEMPTS):
            # multiprocessing starts a new server when its own has died, but one killed a
            # moment ago still looks alive (waitpid has nothing yet) and drops the request.
            try:
                proc.start()
                break
            except (EOFError, OSError):
                if attempt == _START_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)
        send.close()
        deadline = time.monotonic() + timeout_s
        message: tuple[str, ...] | None = None
        try:
            ready = multiprocessing.connection.wait([recv, proc.sentinel], timeout=timeout_s)
            # The sentinel is the server's pipe: it reports a child's exit after reaping it, so
            # a child "ended" but still there means the server died. The child runs on,
            # orphaned, and its result still comes through its own pipe.
            server_died = recv not in ready and bool(ready) and processes.running(proc.pid)
            if server_died:
                left = max(0.0, deadline - time.monotonic())
                ready = multiprocessing.connection.wait([recv], timeout=left)
            if recv in ready:
                message = processes.receive(recv)  # None: died while sending, or sent nothing
            grace = _EXIT_GRACE_S if message else max(0.0, deadline - time.monotonic())
            proc.join(grace if ready else 0)
            timed_out = not ready
        finally:
            recv.close()
            if proc.is_alive():
                processes.kill_group(proc.pid)
                proc.join()
            # A child that crashed or was killed by the OS leaves what it started (ranks,
            # DataLoader workers) running in its group: end them too.
            processes.kill_group(proc.pid, leader_gone=True)
        if message is not None:
            return self._from_message(job, message, proc.exitcode, output_path)
        if timed_out:
            return CaseFailure(
                job.label,
                "timeout",
                f"timed out after {timeout_s:g} s (--vram-timeout), killed",
                proc.exitcode,
                _tail(output_path),
            )
        if server_died:  # multiprocessing says 255 for the exit status it could not learn
            return CaseFailure(
                job.label,
                "crash",
                "the worker server died during the case, which then ended without a result "
                "(its exit status is lost with the server)",
                None,
                _tail(output_path),
            )
        return CaseFailure(
            job.label,
            "crash",
            _crash_reason(proc.exitcode),
            proc.exitcode,
            _tail(output_path),
        )

    @staticmethod
    def _from_message(
        job: Job, message: tuple[str, ...], exitcode: int | None, output_path: str
    ) -> MemoryResult | CaseFailure:
        if message[0] == "ok":
            return MemoryResult.from_json(message[1])
        kind, what, tb = message
        reason = f"out of memory: {what}" if kind == "oom" else what
        return CaseFailure(job.label, kind, reason, exitcode, _tail(output_path), tb)  # type: ignore[arg-type]
