"""Which GPUs each pytest-xdist worker may use under ``pytest -n K --gpu``: pure functions.

Workers measure at the same time, so each gets its own disjoint GPUs: on a shared device a case
could run out of memory because of a neighbour's allocations, and the device-wide NVML reading
(the fallback in containers and on MIG) would count the neighbour's memory. The controller's
visible GPUs (``CUDA_VISIBLE_DEVICES``, or all of them) are cut into ``K`` contiguous blocks,
the first blocks one GPU larger when ``K`` does not divide the count; each worker then sets
``CUDA_VISIBLE_DEVICES`` to its block (``worker_env``) before anything in it touches CUDA, so
inside a worker its GPUs are ``cuda:0..n-1`` and a case with ``ranks=n`` puts one rank on each.

Nothing here imports torch or reads the environment itself: callers pass ``os.environ`` and the
number of GPUs on the machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import pytest

from pytest_vram import cuda_visible
from pytest_vram.cuda_visible import Stop

__all__ = [
    "VISIBLE",
    "devices_for_worker",
    "skip_reason",
    "split_devices",
    "visible_devices",
    "worker_env",
]

VISIBLE: Final = cuda_visible.VARIABLE
MASTER: Final = "master"  # pytest-xdist's worker_id outside any worker (no -n, or -n 0)
_WORKER_ID: Final = re.compile(r"gw(\d+)")


def visible_devices(env: Mapping[str, str], count: int) -> list[str]:
    """The GPUs CUDA will number ``0..n-1`` in a process with this environment, as list entries.

    ``count`` is how many GPUs the driver lists, ignoring ``CUDA_VISIBLE_DEVICES``
    (``nvidia-smi -L``, NVML's device count). The variable is read by CUDA's rules
    (``cuda_visible.read``): unset, ``["0", ..., str(count - 1)]``; empty, ``[]``; a negative
    entry such as ``-1`` ends the list. Entries CUDA would silently drop along with everything
    after them (a typo, an index beyond ``count``) or that would hide every GPU (a repeat) are a
    ValueError naming the entry and the whole value: a worker given a GPU that does not exist
    would measure on fewer than asked.
    """
    if count < 0:
        raise ValueError(f"GPU count {count} is negative")
    raw = env.get(VISIBLE)
    seen = cuda_visible.read(raw, count)
    if seen.repeated:
        raise ValueError(f"{VISIBLE}={raw!r} lists GPU {seen.repeated} twice")
    ignored = "CUDA would ignore it and every entry after it"
    if seen.stop is Stop.BEYOND:
        has = f"{count} GPU(s) (0..{count - 1})" if count else "no GPU"
        raise ValueError(
            f"{VISIBLE}={raw!r} lists GPU {seen.stopped_at}, but this machine has {has}; {ignored}"
        )
    if seen.stop is Stop.MALFORMED:
        raise ValueError(
            f"{VISIBLE}={raw!r}: entry {seen.stopped_at!r} is {Stop.MALFORMED.value}; {ignored}"
        )
    assert seen.devices is not None  # read() lists every GPU when given the count
    return list(seen.devices)


def split_devices(visible: Sequence[str], workers: int) -> list[list[str]]:
    """``visible`` cut into ``workers`` disjoint contiguous blocks, every one non-empty.

    Contiguous rather than round-robin: neighbouring indices usually share a PCIe switch or an
    NVLink bridge, which the ranks of one worker's multi-GPU cases talk over. With 8 GPUs and
    3 workers the blocks hold 3, 3 and 2. Fewer GPUs than workers is a ValueError naming both.
    """
    if workers < 1:
        raise ValueError(f"number of xdist workers must be >= 1, got {workers}")
    repeated = sorted(d for d, n in Counter(visible).items() if n > 1)
    if repeated:
        raise ValueError(f"GPU list {list(visible)} repeats {', '.join(repeated)}")
    if not visible:
        raise ValueError(f"no GPU visible for {workers} xdist worker(s)")
    if len(visible) < workers:
        raise ValueError(
            f"{len(visible)} GPU(s) visible for {workers} xdist workers: each worker needs a GPU "
            f"of its own; run with -n {len(visible)} or fewer"
        )
    size, extra = divmod(len(visible), workers)
    blocks: list[list[str]] = []
    start = 0
    for index in range(workers):
        end = start + size + (1 if index < extra else 0)
        blocks.append(list(visible[start:end]))
        start = end
    return blocks


def _worker_index(worker_id: str) -> int | None:
    """``"gw3"`` -> 3, ``"master"`` -> None; anything else is a ValueError naming it."""
    if worker_id == MASTER:
        return None
    match = _WORKER_ID.fullmatch(worker_id)
    if match is None:
        raise ValueError(f"xdist worker id {worker_id!r} is neither 'master' nor 'gw<N>'")
    return int(match.group(1))


def devices_for_worker(worker_id: str, visible: Sequence[str], workers: int) -> list[str]:
    """The GPUs of ``worker_id`` (``"gw3"``; ``"master"`` outside xdist gets all of ``visible``).

    xdist numbers a worker that replaces a crashed one past the count (``gw4`` of 4 workers);
    it takes the block of ``gw<N mod workers>``, shared with that worker for the rest of the run.
    """
    index = _worker_index(worker_id)
    if index is None:
        return list(visible)
    return split_devices(visible, workers)[index % workers]


def worker_env(worker_id: str, workers: int, env: Mapping[str, str], count: int) -> dict[str, str]:
    """The variables to set in an xdist worker before anything in it touches CUDA.

    ``{"CUDA_VISIBLE_DEVICES": "2,3"}`` for a worker; ``{}`` for ``"master"`` (no xdist: the
    environment stays as the user set it). ``env`` is the controller's environment, which xdist
    workers inherit; ``workers`` and ``worker_id`` come from ``config.workerinput``
    (``workercount``, ``workerid``). It must be applied before the worker's forkserver starts,
    since the measuring children inherit the forkserver's environment. Errors name the
    variable's value and the numbers involved.
    """
    if _worker_index(worker_id) is None:
        return {}
    visible = visible_devices(env, count)
    try:
        devices = devices_for_worker(worker_id, visible, workers)
    except ValueError as exc:
        source = (
            f"{VISIBLE}={env[VISIBLE]!r}"
            if VISIBLE in env
            else f"{VISIBLE} unset, {count} GPU(s) on this machine"
        )
        raise ValueError(f"pytest -n {workers} --gpu: {exc} ({source})") from None
    return {VISIBLE: ",".join(devices)}


def skip_reason(
    ranks_needed: int, devices: Sequence[str], worker_id: str | None = None
) -> str | None:
    """None when ``devices`` can hold a case of ``ranks_needed`` ranks (one GPU each), else why not.

    ``"needs 4 GPUs, this xdist worker has 2 (CUDA_VISIBLE_DEVICES='2,3')"`` plus what to change.
    ``worker_id`` (``"gw1"``, ``"master"``) makes the message name the worker.
    """
    if ranks_needed < 1:
        raise ValueError(f"ranks_needed must be >= 1, got {ranks_needed}")
    if ranks_needed <= len(devices):
        return None
    index = None if worker_id is None else _worker_index(worker_id)
    if worker_id == MASTER:
        who, hint = "this run has", "make more GPUs visible"
    else:
        who = "this xdist worker has" if index is None else f"xdist worker {worker_id} has"
        hint = "run with fewer xdist workers (-n) so each gets more GPUs"
    noun = "GPU" if ranks_needed == 1 else "GPUs"
    value = ",".join(devices)
    return f"needs {ranks_needed} {noun}, {who} {len(devices)} ({VISIBLE}={value!r}); {hint}"


# -- the plugin's side: these read the process environment and ask a fresh interpreter --------


def _gpu_count() -> int:
    """GPUs on the machine, whatever CUDA_VISIBLE_DEVICES says; asked of a fresh interpreter,
    with the NVML-based count, which leaves that interpreter's CUDA uninitialised."""
    env = {k: v for k, v in os.environ.items() if k != VISIBLE}
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    code = "import torch; print(torch.cuda.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return parse_gpu_count(proc.returncode, proc.stdout, proc.stderr)


def parse_gpu_count(returncode: int, stdout: str, stderr: str) -> int:
    """The count a ``print(torch.cuda.device_count())`` interpreter printed; a failed one is a
    UsageError with its last line, never "0 GPUs"."""
    text = stdout.strip().splitlines()[-1:] or [""]
    if returncode == 0 and text[0].isdigit():
        return int(text[0])
    detail = (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]
    raise pytest.UsageError(
        f"--gpu: could not count the GPUs: python -c 'import torch; "
        f"print(torch.cuda.device_count())' exited with {returncode}: {detail}"
    )


def check_workers(workers: int) -> None:
    """In the xdist controller, before any worker starts: more workers than visible GPUs is one
    usage error here, not one per worker."""
    if workers < 1:
        return
    count = _gpu_count()
    try:
        worker_env("gw0", workers, os.environ, count)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def assign_gpus(workerinput: dict[str, Any] | None) -> list[str]:
    """The GPUs this process measures on. An xdist worker takes its own share (and sets
    CUDA_VISIBLE_DEVICES before its worker children exist), so no two workers share a GPU."""
    count = _gpu_count()
    try:
        if workerinput is not None:
            wid, workers = workerinput["workerid"], workerinput["workercount"]
            os.environ.update(worker_env(wid, workers, os.environ, count))
        return visible_devices(os.environ, count)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def check_gpu_visible() -> None:
    """Ask a fresh interpreter, so this process never initialises CUDA before forking."""
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or ["torch.cuda.is_available() is False"]
        raise pytest.UsageError(
            f"--gpu was given but no GPU is visible to torch ({detail[0]}); "
            "run without --gpu to measure on the host meter"
        )
