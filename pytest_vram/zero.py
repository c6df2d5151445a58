"""DeepSpeed ZeRO: the config a spec runs with, the engine as a trainer, and ranks as processes.

Each rank is a process forked from the case's child, with the environment ``torch.distributed``
reads (RANK, WORLD_SIZE, ...). A rank runs the same ``run_step`` loop as a plain case, with the
DeepSpeed engine in place of the optimizer, under its own meter; the case's result is the max
over ranks, with every rank's result kept in ``MemoryResult.ranks``.

On the host meter, what DeepSpeed offloads (the optimizer's fp32 master partitions and state,
ZeRO-3's parameter partitions, pinned buffers) is tagged as host memory when it is created and
reported as ``host_offload_bytes``, outside the device peak: so "offload must not raise device
memory" is checked on CPU as it would be on a GPU.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import torch

from pytest_vram import methods
from pytest_vram.errors import is_oom
from pytest_vram.meters.base import MemoryResult, Meter, Roles
from pytest_vram.spec import StepSpec

__all__ = [
    "RankOutOfMemory",
    "ZeroTrainer",
    "build_ops",
    "ds_config",
    "run_ranks",
    "set_accelerator",
]

# DeepSpeed attributes holding, per stage, the flat model weights and the gradient partitions (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, 0.16-0.19).
_PARAM_ATTRS: Final = (
    "bit16_groups_flat",
    "fp16_partitioned_groups_flat",
    "lp_param_buffer",
    "bf16_groups_flat",
)
_GRAD_ATTRS: Final = (
    "averaged_gradients",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "fp32_groups_gradients_flat",
    "fp32_groups_gradient_flat_partition",
)
# Not listed: the reduction buckets (ipg_buckets, temp_grad_buffer_for_*_offload) are
# communication scratch, sized by the config; they count as temporaries.
# The fp32 master partitions the client optimizer steps (offloaded with the optimizer).
_MASTER_ATTRS: Final = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
_FOREVER: Final = 10**9


def ds_config(spec: StepSpec, largest_param_numel: int) -> dict[str, Any]:
    """The DeepSpeed config for ``spec``. Buckets are sized to the model: DeepSpeed's defaults
    (5e8 elements) pre-allocate buffers that would dwarf a small model and say nothing about it."""
    assert spec.zero is not None
    bucket = max(largest_param_numel, 2**16)
    zero: dict[str, Any] = {
        "stage": spec.zero,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if spec.zero == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            stage3_max_live_parameters=2 * bucket,
            stage3_max_reuse_distance=2 * bucket,
            # The default (1e5 elements) keeps every parameter of a tiny model unpartitioned.
            stage3_param_persistence_threshold=0,
        )
    if spec.offload in ("optimizer", "both"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload in ("param", "both"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # Keep the client torch optimizer under offload (else DeepSpeedCPUAdam replaces it).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _FOREVER,
        "wall_clock_breakdown": False,
    }
    if spec.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif spec.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return config


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in methods.state_tensors(obj) if t.untyped_storage().nbytes()]


class ZeroTrainer:
    """The DeepSpeed engine around a model and its client optimizer, built inside the meter."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: StepSpec, meter: Meter
    ) -> None:
        import deepspeed

        largest = max(p.numel() for p in model.parameters())
        self.config = ds_config(spec, largest)
        self.meter = meter
        self.method = methods.METHODS[spec.method]
        self.inner = optimizer
        self.offload_optimizer = spec.offload in ("optimizer", "both")
        self.offload_param = spec.offload in ("param", "both")
        with self._pinned_is_offloaded(spec.offload != "none"):
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.engine: Any = engine
        # The master gradients exist only while the inner step runs: note roles around it.
        optimizer.register_step_pre_hook(lambda *_: self._enter_inner_step())
        optimizer.register_step_post_hook(lambda *_: self._leave_inner_step())
        if self.offload_optimizer:
            self._offloaded(self._inner_tensors())
        if self.offload_param:
            self._offloaded(self._partitions())
        self._host: contextlib.ExitStack | None = None

    @property
    def forward(self) -> torch.nn.Module:
        engine: torch.nn.Module = self.engine
        return engine

    def _offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        mark = getattr(self.meter, "offloaded", None)
        if mark is not None:
            mark(list(tensors))

    def _enter_inner_step(self) -> None:
        self._note()
        scope = getattr(self.meter, "host_scope", None)
        if self.offload_optimizer and scope is not None:
            # The step runs on the host: its state and temporaries are host memory.
            self._host = contextlib.ExitStack()
            self._host.enter_context(scope())

    def _leave_inner_step(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.offload_optimizer:
            self._offloaded(self._inner_tensors())
        self._note()

    @contextlib.contextmanager
    def _pinned_is_offloaded(self, active: bool) -> Iterator[None]:
        """DeepSpeed pins the host buffers it offloads to; note them as they are made."""
        if not active:
            yield
            return
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        pin = accelerator.pin_memory

        def pinned(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out: torch.Tensor = pin(tensor, *args, **kwargs)
            self._offloaded([out])
            return out

        accelerator.pin_memory = pinned
        try:
            yield
        finally:
            del accelerator.pin_memory

    def _partitions(self) -> list[torch.Tensor]:
        params = self.engine.module.parameters()
        return [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]

    def _inner_tensors(self) -> list[torch.Tensor]:
        """The client optimizer's master partitions, their gradients and its state."""
        model_ptrs = {t.untyped_storage().data_ptr() for t in self._model_tensors()}
        masters = self._masters()
        out = [p for p in masters if p.untyped_storage().data_ptr() not in model_ptrs]
        out += [p.grad for p in masters if p.grad is not None]
        return out + _tensors(self.inner.state)

    def _masters(self) -> list[torch.Tensor]:
        zopt = self.engine.optimizer
        masters = [t for name in _MASTER_ATTRS for t in _tensors(getattr(zopt, name, None))]
        return masters + [p for g in self.inner.param_groups for p in g["params"]]

    def _model_tensors(self) -> list[torch.Tensor]:
        params = list(self.engine.module.parameters())
        zopt = self.engine.optimizer
        flat = [t for name in _PARAM_ATTRS for t in _tensors(getattr(zopt, name, None))]
        return params + self._partitions() + flat

    def roles(self) -> Roles:
        module = self.engine.module
        params = self._model_tensors()
        model_ptrs = {t.untyped_storage().data_ptr() for t in params}
        zopt = self.engine.optimizer
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        grads += [t for name in _GRAD_ATTRS for t in _tensors(getattr(zopt, name, None))]
        masters = self._masters()
        grads += [p.grad for p in masters if p.grad is not None]
        state = [p for p in masters if p.untyped_storage().data_ptr() not in model_ptrs]
        return Roles(
            params=params,
            buffers=[*module.buffers(), *self.method.state_tensors(module)],
            grads=grads,
            optimizer=state + _tensors(self.inner.state),
        )

    def _note(self) -> None:
        note = getattr(self.meter, "note", None)
        if note is not None:
            note(self.roles())

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._note()  # gradient partitions: freed inside engine.step()
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def notes(self) -> tuple[str, ...]:
        return ()  # the config is in the result (zero_config)


def set_accelerator(on_gpu: bool) -> None:
    """DeepSpeed's accelerator for this process and its ranks, whatever the user exported:
    DeepSpeed reads DS_ACCELERATOR once, when it is imported, and a GPU rank given the CPU
    accelerator (or a host rank given CUDA's) would measure the wrong device."""
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"


class RankOutOfMemory(MemoryError):
    """A rank ran out of memory; the message names the rank and carries its traceback."""


def build_ops() -> list[str]:
    """JIT-build the DeepSpeed ops a ZeRO case loads (on CPU, the shared-memory collectives
    ``init_distributed`` uses: about 50 s the first time). Builds land in
    TORCH_EXTENSIONS_DIR and are reused; run this once in CI rather than inside a timed case."""
    set_accelerator(torch.cuda.is_available())
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["ShareMemCommBuilder"] if accelerator.device_name() == "cpu" else []
    for name in names:
        accelerator.create_op_builder(name).load()
    return names


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
