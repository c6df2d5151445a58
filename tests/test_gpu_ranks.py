"""The GPU path's logic that runs anywhere: which accelerator DeepSpeed gets, how a rank's and
a case's out-of-memory errors are reported, and what a cuda case child checks first."""

from __future__ import annotations

import os

import pytest
import torch

from pytest_vram import StepSpec, ranks
from pytest_vram.errors import is_oom
from pytest_vram.worker import CaseFailure, Job, Worker, _kind
from pytest_vram.zero import ops

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 1 has a total capacity of 79.19 GiB"
)


@pytest.mark.parametrize(("on_gpu", "expected"), [(True, "cuda"), (False, "cpu")])
def test_deepspeed_gets_the_meters_accelerator_whatever_was_exported(
    monkeypatch: pytest.MonkeyPatch, on_gpu: bool, expected: str
) -> None:
    # docs/gpu.md showed `DS_ACCELERATOR=cpu pytest-vram build-ops`: exported, it reached GPU ranks.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu" if on_gpu else "cuda")
    ops.set_accelerator(on_gpu)
    assert os.environ["DS_ACCELERATOR"] == expected


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError(CUDA_OOM),
        RuntimeError(f"wrapped by a library: {CUDA_OOM}"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
        ),
        MemoryError(),
        ranks.rank_error(1, 2, "oom", f"Traceback ...\ntorch.OutOfMemoryError: {CUDA_OOM}"),
    ],
)
def test_out_of_memory_errors_are_told_apart(exc: BaseException) -> None:
    assert is_oom(exc) and _kind(exc) == "oom"


def test_a_ranks_failure_names_the_rank_and_keeps_its_kind() -> None:
    oom = ranks.rank_error(1, 4, "oom", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory")
    assert isinstance(oom, ranks.RankOutOfMemory)
    first, *rest = str(oom).splitlines()
    assert first == "rank 1 of 4 ran out of memory: torch.OutOfMemoryError: CUDA out of memory"
    assert rest[0] == "Traceback ..."  # the rank's own traceback follows
    other = ranks.rank_error(0, 4, "error", "Traceback ...\nValueError: bad")
    assert type(other) is RuntimeError and not is_oom(other) and _kind(other) == "error"
    assert str(other).startswith("rank 0 of 4 failed: ValueError: bad\nTraceback")


def test_a_cuda_case_in_a_host_server_is_refused_before_forking() -> None:
    # This test process's server is the host one (the session's device is host).
    worker = Worker("host")
    assert worker.meter == "host"
    out = worker.run(Job("cuda", spec=StepSpec(model="tiny-llama")), timeout_s=60)
    assert isinstance(out, CaseFailure) and out.kind == "spec"
    assert (
        "run with --gpu" in out.reason and "preloads libraries that initialise CUDA" in out.reason
    )
