"""run_step: the single code path that every meter measures.

Build the model, apply the method, take ``spec.steps`` training steps, and let the meter read
each step's peak. Everything, the model included, is created inside the meter, so the peak is
what the device would hold; each step's window starts from what is live when it begins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import platform
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from pytest_vram import errors, methods, stages
from pytest_vram.meters.base import MemorySnapshots, Meter, RepeatsLayers, RepeatsSteps, Roles
from pytest_vram.result import MemoryResult, StepMeasure
from pytest_vram.spec import StepSpec

if TYPE_CHECKING:
    from pytest_vram.zero import engine

__all__ = ["library_versions", "optimizer_phases", "result_of", "roles_of", "run_step"]

_LIBRARIES = ("torch", "transformers", "peft", "pytest-vram")
# Weights' dtype; amp-* keeps fp32 weights (the master copy) and autocasts the compute.
_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "amp-bf16": torch.float32,
    "amp-fp16": torch.float32,
}
_AUTOCAST = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def roles_of(
    model: torch.nn.Module | None,
    optimizer: Any = None,
    method: methods.Method | None = None,
    optimizer_impl: methods.Optimizer | None = None,
    frozen: Sequence[torch.nn.Module] = (),
) -> Roles:
    """Tensors by role; ``frozen`` models (a DPO reference) add parameters and buffers only."""
    params = list(model.parameters()) if model is not None else []
    buffers = list(model.buffers()) if model is not None else []
    for extra in frozen:
        params.extend(extra.parameters())
        buffers.extend(extra.buffers())
    if method is not None and model is not None:
        buffers.extend(method.state_tensors(model))
    if optimizer is None:
        state: list[torch.Tensor] = []
    elif optimizer_impl is not None:
        state = list(optimizer_impl.state_tensors(optimizer))
    else:
        state = list(methods.state_tensors(getattr(optimizer, "state", {})))
    return Roles(
        params=params,
        buffers=buffers,
        grads=[p.grad for p in params if p.grad is not None],
        optimizer=state,
    )


def _autocast(spec: StepSpec, device: str) -> contextlib.AbstractContextManager[Any]:
    # No GradScaler with amp-fp16: its state is a few scalars, not worth a second code path.
    if spec.precision in _AUTOCAST:
        dtype = _AUTOCAST[spec.precision]
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def _most(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _numel(p: torch.Tensor) -> int:
    numel: int = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions p.data away
    return numel


def _dtype_bytes(params: Sequence[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in params:
        name = str(p.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + _numel(p) * p.element_size()
    return dict(sorted(out.items()))


def result_of(
    label: str,
    spec: StepSpec | None,
    meter: Meter,
    steps: list[StepMeasure],
    model: torch.nn.Module | None,
    notes: tuple[str, ...] = (),
) -> MemoryResult:
    worst = max(steps, key=lambda s: s.peak_bytes)
    params = list(model.parameters()) if model is not None else []
    versions = library_versions()
    versions.update(meter.versions())
    return MemoryResult(
        label=label,
        meter=meter.name,
        device=meter.fingerprint(),
        peak_bytes=worst.peak_bytes,
        step_peak_bytes=tuple(s.peak_bytes for s in steps),
        breakdown=worst.breakdown,
        spec=spec,
        reserved_bytes=_most([s.reserved_bytes for s in steps]),
        allocated_bytes=_most([s.allocated_bytes for s in steps]),
        nvml_bytes=_most([s.nvml_bytes for s in steps]),
        peak_source=meter.peak_source,
        host_offload_bytes=max(s.host_offload_bytes for s in steps),
        trainable_params=sum(_numel(p) for p in params if p.requires_grad),
        total_params=sum(_numel(p) for p in params),
        param_dtype_bytes=_dtype_bytes(params),
        versions=versions,
        environment=dict(meter.environment()),
        notes=notes + tuple(meter.notes),
    )


def _checkpointing_enable(model: Any) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grad_roles(p: torch.Tensor) -> Roles:
    return Roles(params=(), buffers=(), grads=() if p.grad is None else (p.grad,), optimizer=())


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class _OptimizerTrainer:
    """The optimizer as the method built it, stepped directly: the trainer of a case without
    DeepSpeed (``zero.engine.ZeroTrainer`` is the one with it)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        spec: StepSpec,
        method: methods.Method,
        opt: methods.Optimizer,
        frozen: Callable[[], Sequence[torch.nn.Module]],
        meter: Meter,
        keep_grads: bool = True,
    ) -> None:
        self.model, self.optimizer, self.spec = model, optimizer, spec
        self.method, self.opt, self.frozen = method, opt, frozen
        self.config: dict[str, Any] | None = None
        self.forward = model
        hook = torch.Tensor.register_post_accumulate_grad_hook  # untyped in torch
        for p in model.parameters():
            if not p.requires_grad:
                continue
            # LOMO and BAdam drop each gradient inside backward or step, before step_end
            # sees it: a storage that was ever a .grad in this step counts as a gradient.
            hook(p, lambda p: meter.note(_grad_roles(p)))  # type: ignore[no-untyped-call]
            if not keep_grads:
                # Dropped on arrival: the step holds weights and activations only (what the
                # ZeRO simulation traces; it lays gradients and state out per rank itself).
                hook(p, _drop_grad)  # type: ignore[no-untyped-call]

    def backward_step(self, loss: torch.Tensor) -> None:
        self.opt.backward_step(self.optimizer, loss, self.spec)

    def optimizer_step(self) -> None:
        """The step without the backward, for a replayed step (``repeats_backward``)."""
        self.optimizer.step()

    def roles(self) -> Roles:
        return roles_of(self.model, self.optimizer, self.method, self.opt, self.frozen())

    def zero_grad(self) -> None:
        self.opt.zero_grad(self.optimizer)

    def notes(self) -> tuple[str, ...]:
        return self.opt.notes(self.optimizer)


class Phases:
    """Marks the optimizer phase at the first optimizer step of each training step: every
    optimizer the methods build (bitsandbytes', GaLore's, DeepSpeed's base optimizer) is a torch
    Optimizer, whose global pre-hook sees it; LOMO updates inside backward and has none.
    ``then``: the phase that follows an optimizer step, for a user's function whose own phases
    are unknown; run_step marks its phases itself."""

    def __init__(self, meter: Meter, then: str | None = None) -> None:
        self.meter = meter
        self.then = then
        self.step = 0
        self._marked = 0

    def before(self, *_: object) -> None:
        if self.step and self._marked != self.step:
            self._marked = self.step
            self.meter.phase("optimizer", self.step)

    def after(self, *_: object) -> None:
        if self.then is not None and self._marked == self.step:
            self.step += 1
            self.meter.phase(self.then, self.step)


@contextlib.contextmanager
def optimizer_phases(meter: Meter, then: str | None = None) -> Iterator[Phases]:
    phases = Phases(meter, then)
    handles = [
        register_optimizer_step_pre_hook(phases.before),
        register_optimizer_step_post_hook(phases.after),
    ]
    try:
        yield phases
    finally:
        for handle in handles:
            handle.remove()


def run_step(spec: StepSpec, meter: Meter, rank_imports: Sequence[str] = ()) -> MemoryResult:
    """One case under ``meter``; a ZeRO spec runs on ``spec.ranks`` forked ranks, each of
    which imports ``rank_imports`` first."""
    method = methods.METHODS[spec.method]
    opt = methods.OPTIMIZERS[spec.optimizer]
    for part in (method, opt):
        reason = part.unsupported(spec, meter.device)
        if reason:
            raise errors.Unsupported(reason)
    if spec.zero is not None and meter.simulates_zero:
        from pytest_vram.zero import simulation

        return simulation.simulate(_simulation_trace(spec, meter), spec)
    if spec.zero is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError(
                errors.missing_library(
                    "DeepSpeed", errors.extra("zero"), needed_by=f"zero={spec.zero} runs"
                )
            )
        from pytest_vram import ranks

        body = functools.partial(_run, spec)
        return ranks.run_ranks(spec.ranks, spec.label, meter, body, rank_imports, start_group=True)
    return _run(spec, meter)


def _simulation_trace(spec: StepSpec, meter: Meter) -> MemoryResult:
    """The trace ``zero.simulation`` lays ``spec`` out from: kept by the meter's session for
    its other ZeRO specs of the same step (``zero.traces``), or made here."""
    from pytest_vram.zero import simulation

    plain = simulation.plain(spec)
    store = meter.traces
    key = store.key(plain, spec) if store is not None else None
    if store is None or key is None:
        return _run(plain, meter, simulation_of=spec)
    traced = store.get(key, spec)
    if traced is None:
        traced = _run(plain, meter, simulation_of=spec)
        store.put(key, traced)
    return traced


def _run(spec: StepSpec, meter: Meter, simulation_of: StepSpec | None = None) -> MemoryResult:
    """``simulation_of``: trace the step for ``zero.simulation`` to lay out as that ZeRO spec,
    with gradients dropped on arrival (it lays gradients and state out per rank itself); the
    result's ``zero_config`` is the config that spec's engine would run with."""
    simulation_trace = simulation_of is not None
    method = methods.METHODS[spec.method]
    opt = methods.OPTIMIZERS[spec.optimizer]
    torch.manual_seed(spec.seed)
    steps: list[StepMeasure] = []
    snapshots = meter if isinstance(meter, MemorySnapshots) else None
    if snapshots is not None:
        snapshots.snapshot_label = spec.label
    with meter, optimizer_phases(meter) as phases:
        meter.phase("setup", 0)
        model = method.build_model(spec, _DTYPES[spec.precision], meter.device)
        model.config.use_cache = False  # type: ignore[union-attr]  # training: no KV cache
        if spec.grad_ckpt:
            # Frozen embeddings give inputs without grad; checkpointed blocks then need this hook.
            model.enable_input_require_grads()  # type: ignore[operator]
            _checkpointing_enable(model)
        model = method.prepare(model, spec)
        model.train()
        optimizer = method.build_optimizer(model, spec, opt)
        trainer: _OptimizerTrainer | engine.ZeroTrainer
        planned = None
        if simulation_of is not None:
            from pytest_vram.zero import engine

            planned = engine.engine_config(simulation_of, model)
            engine.cast_as_engine(model, planned)
        if spec.zero is None:
            trainer = _OptimizerTrainer(
                model,
                optimizer,
                spec,
                method,
                opt,
                lambda: stage.frozen_models(),
                meter,
                keep_grads=not simulation_trace,
            )
        else:
            from pytest_vram.zero import engine

            trainer = engine.ZeroTrainer(model, optimizer, spec, meter)
        stage = stages.STAGES[spec.stage](model, spec, meter.device, trainer.forward)
        replays = (
            meter
            if isinstance(meter, RepeatsSteps)
            and isinstance(trainer, _OptimizerTrainer)
            and opt.repeats_backward
            else None
        )
        # Layers repeat within a step whatever the optimizer does between steps (LOMO's update
        # inside the backward runs live from each replayed gradient's hooks).
        if isinstance(meter, RepeatsLayers) and isinstance(trainer, _OptimizerTrainer):
            meter.repeat_layers(model)
        for step in range(1, spec.steps + 1):
            meter.step_begin()
            phases.step = step
            if replays is not None and step > 1 and replays.replay_step(step):
                assert isinstance(trainer, _OptimizerTrainer)  # replays is None otherwise
                trainer.optimizer_step()
                steps.append(meter.step_end(trainer.roles()))
                trainer.zero_grad()
                replays.replayed_step_end()
                continue
            meter.phase("forward", step)
            inputs = stage.batch()
            with _autocast(spec, meter.device):
                loss = stage.loss(inputs)
            meter.phase("backward", step)
            if replays is not None:
                assert isinstance(trainer, _OptimizerTrainer)  # replays is None otherwise
                loss.backward()  # type: ignore[no-untyped-call]  # repeats_backward: all it does
                replays.backward_end(step)
                trainer.optimizer_step()
            else:
                trainer.backward_step(loss)
            # Roles are not kept: holding them would keep this step's gradients alive.
            steps.append(meter.step_end(trainer.roles()))
            if replays is not None and step == 1:
                replays.first_step_end(list(model.parameters()))
            trainer.zero_grad()
            del loss, inputs
        result = result_of(spec.label, spec, meter, steps, model, trainer.notes())
    # A snapshot is written when the meter exits, and the cuda meter's timeline read from it.
    snapshot = snapshots.snapshot_path if snapshots is not None else None
    zero_config = planned if planned is not None else trainer.config
    return dataclasses.replace(
        result, zero_config=zero_config, snapshot_path=snapshot, timeline=meter.timeline()
    )
