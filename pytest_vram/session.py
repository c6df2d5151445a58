"""The object that owns a pytest-vram run: hooks hand off to it; it holds all the state."""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Final, final

import pytest

from pytest_vram import gpus, invariants
from pytest_vram.baselines import BaselineError, BaselineStore, Entries
from pytest_vram.marker import MARKER, MarkerArgs, check_capacity, check_device, parse_marker
from pytest_vram.meters import unsupported
from pytest_vram.meters.base import GIB, MemoryResult
from pytest_vram.options import Settings
from pytest_vram.report import Summary, write_json
from pytest_vram.spec import SpecError, StepSpec
from pytest_vram.verdict import Budget, CaseVerdict, judge
from pytest_vram.worker import CaseFailure, Job, Worker

__all__ = ["RESULTS", "Recorder", "VramSession"]

MARKER_ARGS: Final = pytest.StashKey[MarkerArgs]()
RESULTS: Final = pytest.StashKey[list[MemoryResult]]()
# Device memory each result is checked against (capacity_gb), in the order of RESULTS.
CAPACITIES: Final = pytest.StashKey[list[int | None]]()
_PROPERTY: Final = "vram"
# Host baselines need no probe of the device; cuda fingerprints come back with the first result.
_STATIC_FINGERPRINTS: Final = {"host": "host-cpu", "fake": "fake"}


def split_nodeid(nodeid: str) -> tuple[str, str]:
    module, _, test = nodeid.partition("::")
    return module, test


@final
class Recorder:
    """The ``vram`` fixture: runs cases in the isolated worker and keeps their results.

    ``assert_le`` / ``assert_lt`` / ``assert_ordered`` compare results (see ``invariants``).
    """

    assert_le = staticmethod(invariants.assert_le)
    assert_lt = staticmethod(invariants.assert_lt)
    assert_ordered = staticmethod(invariants.assert_ordered)

    def __init__(self, session: VramSession, item: pytest.Item) -> None:
        self._session = session
        self._item = item
        self.results: list[MemoryResult] = item.stash.setdefault(RESULTS, [])
        self._capacities: list[int | None] = item.stash.setdefault(CAPACITIES, [])
        args = item.stash.get(MARKER_ARGS, None)
        self._capacity_gb = args.capacity_gb if args else None
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
            meter = check_device(device) if device is not None else self._device
            capacity = check_capacity(capacity_gb) if capacity_gb is not None else self._capacity_gb
            spec = StepSpec.from_kwargs(**merged)
        except SpecError as exc:
            error = f"vram.step: {exc}"
        else:
            devices = self._session.gpu_devices
            if devices is not None and meter == "cuda":
                worker = getattr(self._item.config, "workerinput", {}).get("workerid", "master")
                reason = gpus.skip_reason(spec.ranks, devices, worker)
                if reason:
                    pytest.skip(f"{reason} [{spec.label}]")
            job = self._session.job(meter, spec=spec, imports=self._imports())
            return self._run(job, capacity)
        pytest.fail(error, pytrace=False)  # outside the except: no chained traceback

    def measure(self, fn: Any, *args: Any, **kwargs: Any) -> MemoryResult:
        """Run an importable function in the isolated child under the meter."""
        __tracebackhide__ = True
        job = self._session.job(
            self._device, fn=fn, args=args, kwargs=kwargs, imports=self._imports()
        )
        try:
            job.check_picklable()
        except SpecError as exc:
            error = str(exc)
        else:
            return self._run(job, self._capacity_gb)
        pytest.fail(error, pytrace=False)

    def _imports(self) -> tuple[str, ...]:
        from pytest_vram.methods import extension_modules

        return self._session.settings.imports + extension_modules()

    def _run(self, job: Job, capacity_gb: float | None) -> MemoryResult:
        __tracebackhide__ = True
        # A spec measured once in a session is not measured again (invariant tests share
        # cases with the cases' own tests); the meters are deterministic or nearly so.
        key = (job.meter, job.spec.to_json(), job.imports) if job.spec is not None else None
        cache = self._session.measured
        out: MemoryResult | CaseFailure | None = cache.get(key) if key else None
        if out is None:
            out = self._session.worker.run(job, self._session.settings.timeout_s)
            if key and isinstance(out, MemoryResult):
                cache[key] = out
        if isinstance(out, CaseFailure):
            if out.kind == "unsupported":  # e.g. a library that calls CUDA, on the host meter
                pytest.skip(f"{out.reason} [{out.label}]")
            if out.kind == "spec":
                pytest.fail(f"vram.step: {out.reason} [{out.label}]", pytrace=False)
            pytest.fail(out.long_repr(), pytrace=False)
        self.results.append(out)
        self._capacities.append(None if capacity_gb is None else int(capacity_gb * GIB))
        return out


@final
class VramSession:
    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self._worker: Worker | None = None
        self.measured: dict[tuple[str, str, tuple[str, ...]], MemoryResult] = {}
        self._snapshot_tmp: str | None = None
        self.gpu_devices: list[str] | None = None  # with --gpu: the GPUs this process may use
        # The meter the worker server is preloaded for: a test marked device="cuda" needs the
        # cuda server even in a host session (its preload must leave fork usable).
        self.worker_meter = settings.device
        self._stores: dict[str, BaselineStore] = {}
        self.collected: dict[str, set[str]] = defaultdict(set)  # module -> test ids
        self.modules: dict[str, pytest.Module] = {}
        self.ran: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(dict)  # (device, module)
        self.pending: dict[tuple[str, str], Entries] = defaultdict(dict)
        self.summary = Summary(update=settings.update)
        self.errors: list[str] = []
        self.devices: set[str] = set()
        if settings.device in _STATIC_FINGERPRINTS:
            self.devices.add(_STATIC_FINGERPRINTS[settings.device])

    def job(self, meter: str, **fields: Any) -> Job:
        options: dict[str, Any] = {}
        if meter == "cuda":
            if self._snapshot_tmp is None:
                self._snapshot_tmp = tempfile.mkdtemp(prefix="pytest-vram-snapshots-")
            options = {"peak_source": self.settings.peak_source, "snapshot_dir": self._snapshot_tmp}
        return Job(meter, meter_options=options, **fields)

    def keep_snapshot(self, result: MemoryResult, failed: bool) -> str | None:
        """A failing GPU case keeps its memory snapshot in the report's folder; others drop it."""
        path = Path(result.snapshot_path) if result.snapshot_path else None
        if path is None or not path.exists():
            return None
        if not failed:
            path.unlink()
            return None
        target = self.settings.snapshots_dir / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        return str(target)

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker(self.worker_meter)
        return self._worker

    def store(self, device: str) -> BaselineStore:
        if device not in self._stores:
            self._stores[device] = BaselineStore(self.settings.baselines_dir, device)
        return self._stores[device]

    # -- collection -------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: deselected tests are not "unused"
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        problems = []
        for item in items:
            module, test = split_nodeid(item.nodeid)
            self.collected[module].add(test)
            parent = item.getparent(pytest.Module)
            if parent is not None:
                self.modules.setdefault(module, parent)
            mark = item.get_closest_marker(MARKER)
            if mark is None:
                continue
            try:
                args = item.stash[MARKER_ARGS] = parse_marker(mark.args, mark.kwargs)
            except SpecError as exc:
                problems.append(f"{item.nodeid}: @pytest.mark.{MARKER}: {exc}")
                continue
            if args.device == "cuda":
                self.worker_meter = "cuda"
            if "model" in args.spec_defaults:  # a whole spec: the meter can be asked now
                meter = args.device or self.settings.device
                reason = unsupported(meter, StepSpec.from_kwargs(**args.spec_defaults))
                if reason:
                    problems.append(f"{item.nodeid}: @pytest.mark.{MARKER}: {reason}")
        if problems:
            raise pytest.UsageError(*problems)

    # -- verdict ----------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report: pytest.TestReport = yield
        if call.when != "call":
            return report
        args = item.stash.get(MARKER_ARGS, None)
        results = item.stash.get(RESULTS, [])
        if args is None and not results:
            return report
        if not results:
            if report.passed:
                report.outcome = "failed"
                report.longrepr = (
                    f"marked {MARKER}(gb={args.gb:g}) but measured nothing: "  # type: ignore[union-attr]
                    "call vram.step(...) or vram.measure(...) with the vram fixture"
                )
            return report
        reasons: list[str] = []
        try:
            verdicts = self._judge(item, args, results, completed=call.excinfo is None)
        except BaselineError as exc:  # fails this test only; the file is left as it is
            report.outcome = "failed"
            report.longrepr = str(exc)
            return report
        for verdict in verdicts:
            report.sections.append((f"vram {verdict.result.label}", verdict.section()))
            row = verdict.row()
            snapshot = self.keep_snapshot(verdict.result, verdict.failed)
            row["snapshot"] = snapshot
            report.user_properties.append((_PROPERTY, row))
            reasons.extend(verdict.reasons)
            if snapshot:
                reasons.append(
                    f"memory snapshot of [{verdict.result.label}]: {snapshot} "
                    "(open it in https://pytorch.org/memory_viz)"
                )
        if reasons and report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(reasons)
        return report

    def _judge(
        self,
        item: pytest.Item,
        args: MarkerArgs | None,
        results: list[MemoryResult],
        completed: bool,
    ) -> list[CaseVerdict]:
        module, test = split_nodeid(item.nodeid)
        tolerance = (
            args.tolerance if args and args.tolerance is not None else self.settings.tolerance
        )
        leak = args.leak_tolerance if args else 0.0
        budget = Budget.from_gib(args.gb if args else None, tolerance, leak)
        hint = f"pytest-vram refresh '{item.nodeid}'"
        verdicts = []
        seen: dict[str, int] = defaultdict(int)
        capacities = item.stash.get(CAPACITIES, [])
        for index, result in enumerate(results):
            seen[result.label] += 1
            label = (
                result.label if seen[result.label] == 1 else f"{result.label} #{seen[result.label]}"
            )
            self.devices.add(result.device)
            baseline = self.store(result.device).get(module, test, label)
            verdict = judge(
                item.nodeid,
                result,
                budget,
                baseline,
                strict=self.settings.strict,
                update=self.settings.update,
                record_hint=hint,
                capacity_bytes=capacities[index] if index < len(capacities) else None,
            )
            verdicts.append(verdict)
            if self.settings.update:
                self.pending[(result.device, module)].setdefault(test, {})[label] = result.to_dict()
            if completed:
                self.ran[(result.device, module)].setdefault(test, set()).add(label)
        return verdicts

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Rows arrive here from xdist workers too (user_properties are serialised).
        for name, value in report.user_properties:
            if name == _PROPERTY and isinstance(value, dict):
                self.summary.rows.append(value)

    # -- baselines at the end ---------------------------------------------------------------

    def _unused(self) -> dict[tuple[str, str], dict[str, set[str] | None]]:
        unused: dict[tuple[str, str], dict[str, set[str] | None]] = defaultdict(dict)
        for device in sorted(self.devices):
            store = self.store(device)
            for module, tests in self.collected.items():
                try:
                    entries = store.load(module)
                except BaselineError as exc:
                    self.errors.append(str(exc))
                    continue
                ran = self.ran.get((device, module), {})
                existing: set[str] | None = None
                for test, cases in entries.items():
                    if test not in tests:
                        # Not collected: gone, or outside this run's selection (a node id,
                        # --lf). Only the module's full list of tests can tell which.
                        if existing is None:
                            existing = self._all_tests(module)
                        if test not in existing:
                            unused[(device, module)][test] = None
                    elif test in ran and set(cases) - ran[test]:
                        unused[(device, module)][test] = set(cases) - ran[test]
        return unused

    def _all_tests(self, module: str) -> set[str]:
        """Every test the module defines, whatever this run selected: collect it afresh."""
        node = self.modules.get(module)
        if node is None:
            return set(self.collected[module])
        tests: set[str] = set()
        stack: list[pytest.Collector] = [node]
        while stack:
            for child in stack.pop().collect():
                if isinstance(child, pytest.Item):
                    tests.add(split_nodeid(child.nodeid)[1])
                elif isinstance(child, pytest.Collector):
                    stack.append(child)
        return tests

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        unused = self._unused()
        for (device, module), tests in sorted(unused.items()):
            path = self.store(device).path_for(module)
            if path.is_relative_to(self.config.rootpath):
                path = path.relative_to(self.config.rootpath)
            for test, labels in sorted(tests.items()):
                names = sorted(labels) if labels else sorted(self.store(device).load(module)[test])
                self.summary.unused.extend(f"{path}: {test} / {label}" for label in names)
        if self.settings.update:
            for key in sorted(set(self.pending) | set(unused)):
                device, module = key
                try:
                    self.store(device).write(module, self.pending.get(key, {}), unused.get(key, {}))
                except BaselineError as exc:
                    self.errors.append(str(exc))
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller prints the summary
            workeroutput["vram_unused"] = self.summary.unused
            workeroutput["vram_errors"] = self.errors
        if self._snapshot_tmp is not None:
            shutil.rmtree(self._snapshot_tmp, ignore_errors=True)
        if workeroutput is None and self.settings.json_path is not None:
            try:
                write_json(self.settings.json_path, self.summary, self.errors)
            except OSError as exc:
                self.errors.append(f"--vram-json: cannot write {self.settings.json_path}: {exc}")
        if self.errors:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {})
        for line in output.get("vram_unused", []):
            if line not in self.summary.unused:
                self.summary.unused.append(line)
        self.errors.extend(e for e in output.get("vram_errors", []) if e not in self.errors)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        try:
            lines = list(self.summary.lines())
        except Exception as exc:  # the summary never breaks the run
            lines = [f"pytest-vram could not render its summary: {exc!r}"]
        if lines or self.errors:
            terminalreporter.section("vram")
            for line in lines:
                terminalreporter.write_line(line)
            for error in self.errors:
                terminalreporter.write_line(f"ERROR: {error}", red=True)
