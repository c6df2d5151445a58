"""Each case's child shares the machine's cores among the processes that run at once (its ZeRO
ranks, the session's xdist workers), rather than torch's default of a thread per core in each."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator

import pytest
import torch

from pytest_vram import StepSpec, worker
from pytest_vram.processes import threads_per_process
from pytest_vram.worker import Job


@pytest.mark.parametrize(
    ("cpus", "processes", "threads"),
    [(2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 2, 8), (16, 3, 5), (1, 1, 1), (8, 0, 8)],
)
def test_threads_share_the_cores(cpus: int, processes: int, threads: int) -> None:
    assert threads_per_process(cpus, processes) == threads


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _shared(monkeypatch: pytest.MonkeyPatch, job: Job, **env: str) -> int:
    """The thread count a case child sets for ``job``, in this process (as ``_execute`` does
    before the step)."""
    for name in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch.set_num_threads(7)
    worker._share_cores(job)
    return torch.get_num_threads()


@pytest.mark.usefixtures("threads")
def test_a_case_takes_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    one = Job("host", spec=StepSpec(model="tiny-llama"))
    ranks = Job("host", spec=StepSpec(model="tiny-llama", zero=2, ranks=2))
    assert _shared(monkeypatch, one) == cpus
    assert _shared(monkeypatch, ranks) == max(1, cpus // 2)
    assert _shared(monkeypatch, ranks, PYTEST_XDIST_WORKER_COUNT="2") == max(1, cpus // 4)
    measured = Job("host", fn=os.getpid, ranks=2)
    assert _shared(monkeypatch, measured, PYTEST_XDIST_WORKER_COUNT="1") == max(1, cpus // 2)


@pytest.mark.usefixtures("threads")
def test_a_thread_count_the_user_set_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job("host", spec=StepSpec(model="tiny-llama", zero=2, ranks=2))
    assert _shared(monkeypatch, job, OMP_NUM_THREADS="3") == 7  # torch's own, untouched


def test_the_case_child_shares_before_it_measures() -> None:
    """Ranks fork from the case child after this, and inherit its count."""
    source = inspect.getsource(worker._execute)
    assert source.index("_share_cores(job)") < source.index("make_meter(")
