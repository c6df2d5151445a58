"""ZeRO ranks as processes: the launch, the errors a rank ends with, and the combined result.

Each rank is a process forked from the case's child, with the environment ``torch.distributed``
reads (RANK, WORLD_SIZE, ...); it runs ``run_step``'s loop with ``zero.engine.ZeroTrainer`` under its
own meter. The case's result is the max over ranks, with every rank's result kept in
``MemoryResult.ranks``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import multiprocessing.connection
import os
import socket
import traceback
from collections.abc import Callable, Sequence

import torch

from pytest_vram import processes
from pytest_vram.errors import is_oom
from pytest_vram.meters.base import DeviceIndexed, Meter
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
            if isinstance(meter, DeviceIndexed):
                meter.use_device(rank)
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

    The ranks are plain forks (``processes.fork``: the case's child is a daemon process) and
    stay in the case's process group, so a timeout kills them too. Fork from a process that has
    not computed yet (the worker's case child): a process whose torch thread pools are running
    can hang in its forked ranks. ``imports`` are imported in each rank after the fork."""
    port = _free_port()
    pids, conns = [], []
    for rank in range(spec.ranks):
        main = functools.partial(_rank_main, rank, spec, meter, body, port, imports=imports)
        pid, recv = processes.fork(main)
        pids.append(pid)
        conns.append(recv)
    results: dict[int, MemoryResult] = {}
    try:
        # Whichever rank fails first is the error: its peers may wait in a collective forever.
        waiting = dict(enumerate(conns))
        while waiting:
            for ready in multiprocessing.connection.wait(list(waiting.values())):
                rank = next(r for r, c in waiting.items() if c is ready)
                message = processes.receive(waiting.pop(rank))
                if message is None:
                    code = processes.reap(pids[rank])
                    pids[rank] = 0
                    ended = ("was " if code < 0 else "") + processes.exit_text(code)
                    raise RuntimeError(
                        f"rank {rank} of {spec.ranks} {ended} before sending a result"
                    )
                kind, payload = message
                if kind != "ok":
                    raise rank_error(rank, spec.ranks, kind, payload)
                results[rank] = MemoryResult.from_json(payload)
    finally:
        for conn in conns:
            conn.close()
        for pid in pids:
            if pid and len(results) < spec.ranks:
                processes.kill(pid)
            if pid:
                processes.reap(pid)
    return combine(spec, [results[r] for r in range(spec.ranks)])


def rank_error(rank: int, ranks: int, kind: str, payload: str) -> Exception:
    """The case's error for a rank's failure message; an out-of-memory one stays one, so the
    worker reports it as out of memory, naming the rank."""
    lines = payload.strip().splitlines()
    last = f": {lines[-1]}" if lines else ""
    if kind == "oom":
        return RankOutOfMemory(f"rank {rank} of {ranks} ran out of memory{last}\n{payload}")
    return RuntimeError(f"rank {rank} of {ranks} failed{last}\n{payload}")


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
