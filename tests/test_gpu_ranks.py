"""The GPU path's logic that runs anywhere: which accelerator DeepSpeed gets, how a rank's and
a case's out-of-memory errors are reported, what a cuda case child and a GPU rank do first, and
what the xdist controller refuses before any worker starts.

The GPU ranks run in this process with CUDA's calls (``set_device``, the bad-fork check) and
DeepSpeed's nccl group replaced by recorders: every patch and variable is monkeypatch's, so
nothing outlives a test."""

from __future__ import annotations

import multiprocessing
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from fresh_server import seen_by_a_case

from pytest_vram import StepSpec, forksafe, gpus, plugin, ranks
from pytest_vram.errors import is_oom
from pytest_vram.meters.cuda import CudaMeter
from pytest_vram.result import MemoryResult
from pytest_vram.worker import CaseFailure, Job, Worker, _execute, _kind
from pytest_vram.zero import ops

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 1 has a total capacity of 79.19 GiB"
)


@pytest.mark.parametrize(("on_gpu", "expected"), [(True, "cuda"), (False, "cpu")])
def test_deepspeed_gets_the_meters_accelerator_whatever_was_exported(
    monkeypatch: pytest.MonkeyPatch, on_gpu: bool, expected: str
) -> None:
    # docs/gpu.md shows `DS_ACCELERATOR=cpu pytest-vram build-ops`: left exported, it must not
    # reach GPU ranks.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu" if on_gpu else "cuda")
    ops.set_accelerator(on_gpu)
    assert os.environ["DS_ACCELERATOR"] == expected


ACCELERATOR = """
def seen(path):
    from deepspeed.accelerator import get_accelerator

    Path(path).write_text(get_accelerator().device_name())
"""


def test_the_host_servers_deepspeed_has_the_cpu_accelerator_whatever_was_exported(
    tmp_path: Path,
) -> None:
    """The host worker server imports DeepSpeed before any case, so its accelerator is the
    server's, not the case child's (set_accelerator there comes after the import)."""
    pytest.importorskip("deepspeed")
    exported = {"DS_ACCELERATOR": "cuda"}  # by the user, for their GPU runs
    assert seen_by_a_case(tmp_path, ACCELERATOR, exported) == "cpu"


@pytest.mark.parametrize(
    ("exported", "gpu", "built", "accelerator"),
    [
        # A GPU machine running the host meter's ZeRO cases too: their gloo ranks need the op.
        ("cpu", True, ["ShareMemCommBuilder", "CPUAdamBuilder"], "cpu"),
        (None, True, [], "cuda"),
        ("cuda", True, [], "cuda"),
        (None, False, ["ShareMemCommBuilder", "CPUAdamBuilder"], "cpu"),
        ("cuda", False, ["ShareMemCommBuilder", "CPUAdamBuilder"], "cpu"),  # no GPU to build for
    ],
)
def test_build_ops_builds_the_cpu_op_on_a_gpu_machine_when_asked(
    monkeypatch: pytest.MonkeyPatch,
    exported: str | None,
    gpu: bool,
    built: list[str],
    accelerator: str,
) -> None:
    # Importing DeepSpeed sets PYTORCH_NVML_BASED_CUDA_CHECK: monkeypatch gives it back.
    monkeypatch.setenv(forksafe.NVML_CHECK, os.environ.get(forksafe.NVML_CHECK, "1"))
    real_accelerator = pytest.importorskip("deepspeed.accelerator.real_accelerator")
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    loaded: list[str] = []

    class Builder:  # the JIT build takes about 50 s: only whether it would run matters here
        def __init__(self, name: str) -> None:
            self.name = name

        def load(self) -> None:
            loaded.append(self.name)

    monkeypatch.setattr(CPU_Accelerator, "create_op_builder", lambda self, name: Builder(name))
    # DeepSpeed keeps the accelerator it made first; build_ops must pick it from DS_ACCELERATOR.
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("DS_ACCELERATOR", exported or "unset")  # given back after the test
    if exported is None:
        monkeypatch.delenv("DS_ACCELERATOR")
    assert ops.build_ops() == built
    assert loaded == built
    assert os.environ["DS_ACCELERATOR"] == accelerator
    assert real_accelerator.get_accelerator().device_name() == accelerator


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


def test_n_2_on_one_gpu_is_one_usage_error_from_the_xdist_controller(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Smoke step 9 without a GPU: the controller counts one GPU and refuses before any worker
    starts (a worker would raise the same error once per worker)."""
    pytest.importorskip("xdist")
    counted: list[int] = []

    def one_gpu() -> int:
        counted.append(1)
        return 1

    monkeypatch.setattr(gpus, "_gpu_count", one_gpu)
    monkeypatch.setattr(plugin, "check_gpu_visible", lambda: None)  # as if a GPU were visible
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2", "--gpu")
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    (error,) = [line for line in result.errlines if "ERROR" in line]
    assert error.startswith("ERROR: pytest -n 2 --gpu: 1 GPU(s) visible for 2 xdist workers")
    assert counted == [1] and "INTERNALERROR" not in text and "gw0" not in text


def test_a_cuda_case_in_a_host_server_is_refused_before_forking() -> None:
    # This test process's server is the host one (the session's device is host).
    worker = Worker("host")
    assert worker.meter == "host"
    out = worker.run(Job("cuda", spec=StepSpec(model="tiny-llama")), timeout_s=60)
    assert isinstance(out, CaseFailure) and out.kind == "spec"
    assert (
        "run with --gpu" in out.reason and "preloads libraries that initialise CUDA" in out.reason
    )


# -- what a GPU rank and a cuda case child do first, on stand-ins for CUDA's calls ---------------

PORT = 29511
CHECK_FORK = forksafe.check_fork


class Stop(Exception):
    """The rank's body: the calls before it are what is checked."""


def _rank_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ranks.torchrun_environment(1, 2, PORT)}


@pytest.fixture
def gpu_rank(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run rank 1 of 2 with a cuda meter in this process; returns (calls, meter, run)."""
    calls: list[tuple[Any, ...]] = []
    for name in ranks.torchrun_environment(1, 2, PORT):
        monkeypatch.setenv(name, "unset")  # so monkeypatch gives each one back
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # left exported after build-ops (docs/gpu.md)
    monkeypatch.setattr(forksafe, "check_fork", lambda where: calls.append(("check_fork", where)))
    monkeypatch.setattr(forksafe, "disarm", lambda: calls.append(("disarm",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    meter = CudaMeter(sample_nvml=False, device_index=0)
    use_device = meter.use_device

    def moved(index: int) -> None:
        calls.append(("use_device", index))
        use_device(index)

    monkeypatch.setattr(meter, "use_device", moved)

    def init_distributed(dist_backend: str) -> None:
        env = _rank_env()
        calls.append(("init_distributed", dist_backend, os.environ["DS_ACCELERATOR"], env))

    # nccl needs GPUs: a stand-in for DeepSpeed takes the one call the rank makes to it.
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = init_distributed  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    # A --vram-import module: the rank imports it once its device is chosen.
    (tmp_path / "rank_registers.py").write_text(
        "import rank_log\nrank_log.append(('import', __name__))\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "rank_log", types.SimpleNamespace(append=calls.append))
    # Recorded as absent, so the module the rank imports is dropped after the test.
    monkeypatch.setitem(sys.modules, "rank_registers", None)
    monkeypatch.delitem(sys.modules, "rank_registers")

    def body(m: Any) -> MemoryResult:
        calls.append(("body", m.device, os.environ["DS_ACCELERATOR"], _rank_env()))
        raise Stop("the rank's step would run here")

    def run(start_group: bool) -> tuple[str, str]:
        launch = ranks._Launch(2, "tiny case", PORT, ("rank_registers",), start_group)
        recv, send = multiprocessing.Pipe(duplex=False)
        ranks._rank_main(1, launch, meter, body, send)
        with recv:
            kind, payload = recv.recv()
        return kind, payload

    return calls, meter, run


@pytest.mark.parametrize("start_group", [True, False])
def test_a_gpu_rank_takes_its_device_before_the_user_code_and_the_nccl_group(
    gpu_rank: Any, start_group: bool
) -> None:
    calls, meter, run = gpu_rank
    kind, payload = run(start_group)
    assert kind == "error" and "Stop: the rank's step would run here" in payload, payload
    torchrun = ranks.torchrun_environment(1, 2, PORT)
    group = [("init_distributed", "nccl", "cuda", torchrun)] if start_group else []
    assert calls == [
        ("check_fork", "rank 1 of 2"),
        ("disarm",),
        ("set_device", 1),  # nccl binds its communicator to the current device
        ("use_device", 1),
        ("import", "rank_registers"),
        *group,
        ("body", "cuda:1", "cuda", torchrun),  # DeepSpeed's CUDA one, whatever was exported
    ]
    assert meter.device_index == 1


def test_a_rank_forked_after_cuda_was_initialised_says_which_rank(
    gpu_rank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, _, run = gpu_rank
    monkeypatch.setattr(forksafe, "check_fork", CHECK_FORK)  # the real one, on a poisoned fork
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    kind, payload = run(True)
    assert kind == "error"
    assert "CudaForkError: rank 1 of 2 was forked from a process that had initialised CUDA" in (
        payload
    )
    assert calls == [], "nothing runs in a poisoned rank"


def test_a_case_child_forked_after_cuda_was_initialised_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _execute arms the probes before its check: give torch.cuda's own back after the test.
    for name in forksafe.PROBES:
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))
    monkeypatch.setattr(forksafe, "_armed", False)
    culprit = "torch.cuda.get_device_capability from culprit_lib (culprit_lib.py:3)"
    monkeypatch.setattr(forksafe, "_seen", [culprit])
    monkeypatch.setenv("DS_ACCELERATOR", "unset")
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(forksafe.CudaForkError) as info:
        _execute(Job("cuda", spec=StepSpec(model="tiny-llama")))
    message = str(info.value)
    assert message.startswith(
        "this case's child process was forked from a process that had initialised CUDA"
    )
    assert culprit in message and _kind(info.value) == "error"
