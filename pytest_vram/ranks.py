"""Ranks as processes: the launch, the errors a rank ends with, and the combined result.

Each rank is a process forked from the case's child, with the environment torchrun gives
(RANK, LOCAL_RANK, WORLD_SIZE, ...), so code written for torchrun or the deepspeed launcher runs
unchanged. A rank runs its body (``run_step``'s loop with ``zero.engine.ZeroTrainer``, or the
user's function under ``vram.measure``) under its own meter. The case's result is the worst
rank's, with every rank's result kept in ``MemoryResult.ranks``.
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
from typing import Final

import torch

from pytest_vram import processes
from pytest_vram.errors import is_oom
from pytest_vram.meters.base import DeviceIndexed, Meter
from pytest_vram.result import MemoryResult
from pytest_vram.zero.ops import set_accelerator

__all__ = [
    "RankOutOfMemory",
    "combine",
    "exception_line",
    "rank_error",
    "run_ranks",
    "torchrun_environment",
]

Body = Callable[[Meter], MemoryResult]
# How long a rank's error waits for news of a peer that died, which would be its cause.
_PEER_GRACE_S: Final = 2.0


class RankOutOfMemory(MemoryError):
    """A rank ran out of memory; the message names the rank and carries its traceback."""


# How many times the ranks start when their rendezvous port was taken (EADDRINUSE).
_PORT_ATTEMPTS: Final = 3
_PORT_TAKEN: Final = "EADDRINUSE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun exports for ``rank`` of ``world`` ranks on one machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _group_was_initialised() -> bool:
    """Whether this process ever had torch.distributed's default group, even if the user's
    code destroyed it before returning (a torchrun script's ``main`` usually does). torch keeps
    the init method of the last default group after ``destroy_process_group``."""
    import torch.distributed.distributed_c10d as c10d

    initialised = torch.distributed.is_initialized()
    return initialised or getattr(c10d, "_default_pg_init_method", None) is not None


@dataclasses.dataclass(frozen=True)
class _Launch:
    world: int
    label: str
    port: int
    imports: Sequence[str]
    # The built-in ZeRO step starts the group itself; the user's code starts its own.
    start_group: bool


def _rank_main(
    rank: int,
    launch: _Launch,
    meter: Meter,
    body: Body,
    conn: multiprocessing.connection.Connection,
) -> None:
    try:
        os.environ.update(torchrun_environment(rank, launch.world, launch.port))
        on_gpu = meter.device.startswith("cuda")
        set_accelerator(on_gpu)
        if on_gpu:
            from pytest_vram import forksafe

            forksafe.check_fork(f"rank {rank} of {launch.world}")
            forksafe.disarm()  # a rank forks nothing: its step runs on torch's own probes
            # Each rank on its own device, chosen before the process group: nccl binds its
            # communicator to the current device, and every .cuda() call lands there.
            torch.cuda.set_device(rank)
            if isinstance(meter, DeviceIndexed):
                meter.use_device(rank)
        for module in launch.imports:  # the user's modules, after the fork (worker._execute)
            importlib.import_module(module)
        if launch.start_group:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        result = body(meter)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        elif launch.world > 1 and not _group_was_initialised():
            raise RuntimeError(
                f"{launch.label} ran on ranks={launch.world} but never initialised "
                "torch.distributed's process group, so each rank trained alone: call "
                "torch.distributed.init_process_group() (or deepspeed.init_distributed()) "
                "as under torchrun, or measure it without ranks="
            )
        conn.send(("ok", result.to_json()))
    except BaseException as exc:  # noqa: B036 - every way out becomes a message
        conn.send(("oom" if is_oom(exc) else "error", traceback.format_exc()))
    finally:
        conn.close()


def run_ranks(
    world: int,
    label: str,
    meter: Meter,
    body: Body,
    imports: Sequence[str] = (),
    *,
    start_group: bool,
) -> MemoryResult:
    """Run ``body`` on ``world`` forked processes; the result of the worst rank, with all.

    The ranks are plain forks (``processes.fork``: the case's child is a daemon process) and
    stay in the case's process group, so a timeout kills them too. Fork from a process that has
    not computed yet (the worker's case child): a process whose torch thread pools are running
    can hang in its forked ranks. ``imports`` are imported in each rank after the fork;
    ``start_group``: start the process group (gloo, or nccl on GPUs) before ``body``.

    The rendezvous port is free when picked, not reserved: a process beside this one (another
    xdist worker's ranks) may take it before rank 0 binds it. Then the ranks start again on a
    new port, at most ``_PORT_ATTEMPTS`` times."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        launch = _Launch(world, label, _free_port(), tuple(imports), start_group)
        try:
            return _run_launch(launch, meter, body)
        except RuntimeError as exc:
            if attempt == _PORT_ATTEMPTS or _PORT_TAKEN not in str(exc):
                raise
    raise AssertionError("unreachable")  # the last attempt returned or raised


def _run_launch(launch: _Launch, meter: Meter, body: Body) -> MemoryResult:
    world, label = launch.world, launch.label
    pids, conns = [], []
    for rank in range(world):
        pid, recv = processes.fork(functools.partial(_rank_main, rank, launch, meter, body))
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
                    raise _died(rank, world, pids)
                kind, payload = message
                if kind != "ok":
                    # A peer's death reaches the others as a collective's error first (gloo:
                    # "Connection reset by peer"): the rank that died is the cause to name.
                    raise _dead_peer(waiting, world, pids) or rank_error(rank, world, kind, payload)
                results[rank] = MemoryResult.from_json(payload)
    finally:
        for conn in conns:
            conn.close()
        for pid in pids:
            if pid and len(results) < world:
                processes.kill(pid)
            if pid:
                processes.reap(pid)
    return combine(label, [results[r] for r in range(world)])


def _died(rank: int, world: int, pids: list[int]) -> RuntimeError:
    code = processes.reap(pids[rank])
    pids[rank] = 0
    ended = ("was " if code < 0 else "") + processes.exit_text(code)
    return RuntimeError(f"rank {rank} of {world} {ended} before sending a result")


def _dead_peer(
    waiting: dict[int, multiprocessing.connection.Connection], world: int, pids: list[int]
) -> RuntimeError | None:
    """A rank among ``waiting`` that ended without a result within a moment, if any."""
    for ready in multiprocessing.connection.wait(list(waiting.values()), timeout=_PEER_GRACE_S):
        rank = next(r for r, c in waiting.items() if c is ready)
        if processes.receive(waiting.pop(rank)) is None:
            return _died(rank, world, pids)
    return None


def rank_error(rank: int, ranks: int, kind: str, payload: str) -> Exception:
    """The case's error for a rank's failure message; an out-of-memory one stays one, so the
    worker reports it as out of memory, naming the rank."""
    first = exception_line(payload)
    last = f": {first}" if first else ""
    if kind == "oom":
        return RankOutOfMemory(f"rank {rank} of {ranks} ran out of memory{last}\n{payload}")
    return RuntimeError(f"rank {rank} of {ranks} failed{last}\n{payload}")


def exception_line(formatted: str) -> str:
    """The first line of the exception a formatted traceback ends with: a message of several
    lines (transformers' DeepSpeed mismatch list) starts with what went wrong."""
    lines = formatted.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    if not frames:  # not a traceback: its last line says what happened
        return lines[-1] if lines else ""
    start = frames[-1] + 1
    while start < len(lines) and lines[start].startswith("    "):  # the frame's code, carets
        start += 1
    return lines[start] if start < len(lines) else lines[-1]


def combine(label: str, ranks: list[MemoryResult]) -> MemoryResult:
    """The case's result: the rank with the highest peak, its peers kept; host bytes summed
    (the ranks of one machine share its host memory)."""
    worst = max(ranks, key=lambda r: r.peak_bytes)
    steps = tuple(max(s) for s in zip(*(r.step_peak_bytes for r in ranks), strict=True))
    return dataclasses.replace(
        worst,
        label=label,
        step_peak_bytes=steps,
        host_offload_bytes=sum(r.host_offload_bytes for r in ranks),
        ranks=tuple(ranks),
    )
