"""The ``vram`` fixture: runs a test's cases in the isolated worker and keeps their results.

It runs in the pytest process (torch-free); the session object judges what it kept.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Final, final

import pytest

from pytest_vram import gpus, invariants
from pytest_vram.calibration import Prediction
from pytest_vram.device_profile import DeviceProfile
from pytest_vram.errors import SpecError
from pytest_vram.marker import (
    MarkerArgs,
    check_capacity,
    check_device,
    check_ranks,
    check_step_names,
)
from pytest_vram.meters import unsupported
from pytest_vram.result import MemoryResult
from pytest_vram.shared_results import Key, SharedResults
from pytest_vram.spec import StepSpec
from pytest_vram.worker import CaseFailure, Job

if TYPE_CHECKING:
    from pytest_vram.session import VramSession

__all__ = ["CAPACITIES", "MARKER_ARGS", "MARKER_ERROR", "RESULTS", "Recorder"]

MARKER_ARGS: Final = pytest.StashKey[MarkerArgs]()
# Why a test's marker cannot be used: that test fails at setup, the rest of the session runs.
MARKER_ERROR: Final = pytest.StashKey[str]()
RESULTS: Final = pytest.StashKey[list[MemoryResult]]()
# Device memory each result is checked against (capacity_gb), in the order of RESULTS.
CAPACITIES: Final = pytest.StashKey[list[int | None]]()


@final
class Recorder:
    """The ``vram`` fixture: runs cases in the isolated worker and keeps their results.

    ``assert_le`` / ``assert_lt`` / ``assert_ordered`` compare results (see ``invariants``).
    """

    assert_le = staticmethod(invariants.assert_le)
    assert_lt = staticmethod(invariants.assert_lt)
    assert_ordered = staticmethod(invariants.assert_ordered)

    def __init__(
        self, session: VramSession, item: pytest.Item, shared: SharedResults | None = None
    ) -> None:
        self._session = session
        self._shared = shared
        self._item = item
        self.results: list[MemoryResult] = item.stash.setdefault(RESULTS, [])
        self._capacities: list[int | None] = item.stash.setdefault(CAPACITIES, [])
        args = item.stash.get(MARKER_ARGS, None)
        self._capacity_bytes = args.capacity_bytes if args else None
        self._device = args.device if args and args.device else session.settings.device

    def step(
        self, *, device: str | None = None, capacity_gb: float | None = None, **kwargs: Any
    ) -> MemoryResult:
        """One training step of ``StepSpec(**kwargs)``; marker spec arguments are the defaults.

        ``device`` picks the meter for this case ("fake" sizes real models without weights);
        ``capacity_gb`` is the device memory it must fit in (a peak above it: predicted OOM)."""
        __tracebackhide__ = True
        args = self._item.stash.get(MARKER_ARGS, None)
        merged = {**(args.spec_defaults if args else {}), **kwargs}
        try:
            check_step_names(kwargs)
            meter = check_device(device) if device is not None else self._device
            capacity = (
                check_capacity(capacity_gb) if capacity_gb is not None else self._capacity_bytes
            )
            spec = StepSpec.from_kwargs(**merged)
        except SpecError as exc:
            error = f"vram.step: {exc}"
        else:
            self._skip_without_gpus(meter, spec.ranks, spec.label)
            job = self._session.job(meter, spec=spec, imports=self._imports())
            return self._run(job, capacity)
        pytest.fail(error, pytrace=False)  # outside the except: no chained traceback

    def measure(self, fn: Any, *args: Any, ranks: int | None = None, **kwargs: Any) -> MemoryResult:
        """Run an importable function in the isolated child under the meter; with ``ranks=N``
        on N ranks with the environment torchrun gives (``RANK``, ``LOCAL_RANK``,
        ``WORLD_SIZE``, ``MASTER_ADDR``, ...), each measured, one GPU each under ``--gpu``."""
        __tracebackhide__ = True
        try:
            world = check_ranks(ranks) if ranks is not None else None
        except SpecError as exc:
            error = f"vram.measure: {exc}"
        else:
            job = self._session.job(
                self._device, fn=fn, args=args, kwargs=kwargs, imports=self._imports(), ranks=world
            )
            try:
                job.check_picklable()  # its message names vram.measure
            except SpecError as exc:
                error = str(exc)
            else:
                self._skip_without_gpus(job.meter, world or 1, job.label)
                return self._run(job, self._capacity_bytes)
        pytest.fail(error, pytrace=False)

    def _skip_without_gpus(self, meter: str, ranks: int, label: str) -> None:
        __tracebackhide__ = True
        devices = self._session.gpu_devices
        if devices is not None and meter == "cuda":
            worker = getattr(self._item.config, "workerinput", {}).get("workerid", "master")
            reason = gpus.skip_reason(ranks, devices, worker)
            if reason:
                pytest.skip(f"{reason} [{label}]")

    def _imports(self) -> tuple[str, ...]:
        from pytest_vram.methods import extension_modules

        return self._session.settings.imports + extension_modules()

    def _predict(
        self, spec: StepSpec, imports: tuple[str, ...], measured: MemoryResult
    ) -> Prediction:
        """The case traced on the fake meter, in a child of its own (reused by a fake case of
        the same spec), on a GPU with the terms of its device profile. What the fake meter
        cannot trace is a prediction with its reason."""
        key = ("fake", spec.to_json(), imports)
        traced: MemoryResult | CaseFailure | None = self._measured(key)
        if traced is None:
            why = unsupported("fake", spec)
            if why:
                return Prediction(unsupported=why)
            job = Job("fake", spec=spec, imports=imports)
            traced = self._session.worker.run(job, self._session.settings.timeout_s)
            if isinstance(traced, MemoryResult):
                self._keep(key, traced)
        if isinstance(traced, CaseFailure):
            return Prediction(unsupported=traced.reason)
        allocated, reserved = traced.allocated_bytes, traced.reserved_bytes
        if measured.meter != "cuda" or allocated is None or reserved is None:
            return Prediction(traced.peak_bytes, allocated, reserved)
        settings = self._session.settings
        profile = DeviceProfile.from_measured(
            measured.device,
            measured.environment,
            context_mib=settings.cuda_context_mib,
            nccl_mib=settings.nccl_mib,
        )
        allocated, reserved, nvml = profile.predict(allocated, reserved, spec.ranks)
        return Prediction(
            traced.peak_bytes,
            allocated,
            reserved,
            nvml_bytes=nvml,
            device=profile.describe(spec.ranks),
        )

    def _measured(self, key: Key) -> MemoryResult | None:
        """The result of ``key`` measured earlier in this session, or by another xdist worker
        of this run."""
        out = self._session.measured.get(key)
        if out is None and self._shared is not None:
            out = self._shared.get(key)
            if out is not None:
                self._session.measured[key] = out
        return out

    def _keep(self, key: Key, result: MemoryResult) -> None:
        self._session.measured[key] = result
        if self._shared is not None:
            self._shared.put(key, result)

    def _run(self, job: Job, capacity_bytes: int | None) -> MemoryResult:
        __tracebackhide__ = True
        # A spec measured once in a session is not measured again (invariant tests share
        # cases with the cases' own tests); the meters are deterministic or nearly so.
        key = (job.meter, job.spec.to_json(), job.imports) if job.spec is not None else None
        out: MemoryResult | CaseFailure | None = self._measured(key) if key else None
        if out is None:
            out = self._session.worker.run(job, self._session.settings.timeout_s)
            if key and isinstance(out, MemoryResult):
                if self._session.settings.predicts and job.spec is not None and job.meter != "fake":
                    prediction = self._predict(job.spec, job.imports, out)
                    out = dataclasses.replace(out, prediction=prediction)
                self._keep(key, out)
        if isinstance(out, CaseFailure):
            if out.kind == "unsupported":  # e.g. a library that calls CUDA, on the host meter
                pytest.skip(f"{out.reason} [{out.label}]")
            if out.kind == "spec":
                pytest.fail(f"vram.step: {out.reason} [{out.label}]", pytrace=False)
            pytest.fail(out.long_repr(), pytrace=False)
        self.results.append(out)
        self._capacities.append(capacity_bytes)
        return out
