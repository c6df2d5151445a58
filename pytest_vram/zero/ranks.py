"""ZeRO ranks as processes: the launch, the errors a rank ends with, and the combined result.

Each rank is a process forked from the case's child, with the environment ``torch.distributed``
reads (RANK, WORLD_SIZE, ...); it runs ``run_step``'s loop with ``zero.engine.ZeroTrainer`` under its
own meter. The case's result is the max over ranks, with every rank's result kept in
``MemoryResult.ranks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import traceback
from collections.abc import Callable, Sequence

import torch

from pytest_vram.errors import is_oom
from pytest_vram.meters.base import Meter
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.zero.ops import set_accelerator

__all__ = [
    "RankOutOfMemory",
    "combine",
    "rank_error",
    "run_ranks",
]


class RankOutOfMemory(MemoryError):
    """A rank ran out of memory; the message names the rank and carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank_main(
    rank: int,
    spec: StepSpec,
    meter: Meter,
    body: Callable[[StepSpec, Meter], MemoryResult],
    port: int,
    conn: multiprocessing.connection.Connection,
    imports: Sequence[str],
) -> None:
    try:
        world = str(spec.ranks)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=world,
            LOCAL_WORLD_SIZE=world,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        on_gpu = meter.device.startswith("cuda")
        set_accelerator(on_gpu)
        if on_gpu:
            from pytest_vram import forksafe

            forksafe.check_fork(f"rank {rank} of {spec.ranks}")
            forksafe.disarm()  # a rank forks nothing: its step runs on torch's own probes
            # Each rank on its own device, chosen before the process group: nccl binds its
            # communicator to the current device, and every .cuda() call lands there.
            torch.cuda.set_device(rank)
            meter.device_index = rank  # type: ignore[attr-defined]
            meter.device = f"cuda:{rank}"
        for module in imports:  # the user's modules, after the fork (see worker._execute)
            importlib.import_module(module)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        result = body(spec, meter)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        conn.send(("ok", result.to_json()))
    except BaseException as exc:  # noqa: B036 - every way out becomes a message
        conn.send(("oom" if is_oom(exc) else "error", traceback.format_exc()))
    finally:
        conn.close()


def run_ranks(
    spec: StepSpec,
    meter: Meter,
    body: Callable[[StepSpec, Meter], MemoryResult],
    imports: Sequence[str] = (),
) -> MemoryResult:
    """Run ``body`` on ``spec.ranks`` forked processes; the result of the worst rank, with all.

    Plain ``os.fork``: the case's child is a daemon process, which multiprocessing forbids to
    have children. The ranks stay in the case's process group, so a timeout kills them too.
    Fork from a process that has not computed yet (the worker's case child): a process whose
    torch thread pools are running can hang in its forked ranks. ``imports`` are imported in
    each rank after the fork."""
    port = _free_port()
    pids, conns = [], []
    for rank in range(spec.ranks):
        recv, send = multiprocessing.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:  # the rank
            recv.close()
            code = 0
            try:
                _rank_main(rank, spec, meter, body, port, send, imports)
            except BaseException:  # noqa: B036 - the message is sent; never return into the caller
                code = 1
            finally:
                os._exit(code)
        send.close()
        pids.append(pid)
        conns.append(recv)
    results: dict[int, MemoryResult] = {}
    try:
        # Whichever rank fails first is the error: its peers may wait in a collective forever.
        waiting = dict(enumerate(conns))
        while waiting:
            for ready in multiprocessing.connection.wait(list(waiting.values())):
                rank = next(r for r, c in waiting.items() if c is ready)
                conn = waiting.pop(rank)
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    _, status = os.waitpid(pids[rank], 0)
                    pids[rank] = 0
                    raise RuntimeError(
                        f"rank {rank} of {spec.ranks} {_status(status)} before sending a result"
                    ) from None
                if kind != "ok":
                    raise rank_error(rank, spec.ranks, kind, payload)
                results[rank] = MemoryResult.from_json(payload)
    finally:
        for conn in conns:
            conn.close()
        for pid in pids:
            if pid and len(results) < spec.ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pid:
                os.waitpid(pid, 0)
    return combine(spec, [results[r] for r in range(spec.ranks)])


def rank_error(rank: int, ranks: int, kind: str, payload: str) -> Exception:
    """The case's error for a rank's failure message; an out-of-memory one stays one, so the
    worker reports it as out of memory, naming the rank."""
    lines = payload.strip().splitlines()
    last = f": {lines[-1]}" if lines else ""
    if kind == "oom":
        return RankOutOfMemory(f"rank {rank} of {ranks} ran out of memory{last}\n{payload}")
    return RuntimeError(f"rank {rank} of {ranks} failed{last}\n{payload}")


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        hint = " (the OS out-of-memory killer sends this)" if sig == signal.SIGKILL else ""
        return f"was killed by {sig.name}{hint}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def combine(spec: StepSpec, ranks: list[MemoryResult]) -> MemoryResult:
    """The case's result: the rank with the highest peak, its peers kept; host bytes summed
    (the ranks of one machine share its host memory)."""
    worst = max(ranks, key=lambda r: r.peak_bytes)
    steps = tuple(max(s) for s in zip(*(r.step_peak_bytes for r in ranks), strict=True))
    return dataclasses.replace(
        worst,
        label=spec.label,
        step_peak_bytes=steps,
        host_offload_bytes=sum(r.host_offload_bytes for r in ranks),
        ranks=tuple(ranks),
    )
