"""The object that owns a pytest-vram run: hooks hand off to it; it holds all the state."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Final, final

import pytest

from pytest_vram.baselines import BaselineError, BaselineStore, Entries
from pytest_vram.errors import SpecError
from pytest_vram.fixture import CAPACITIES, MARKER_ARGS, MARKER_ERROR, RESULTS
from pytest_vram.marker import MARKER, MarkerArgs, parse_marker
from pytest_vram.meters import unsupported
from pytest_vram.meters.base import FIXED_FINGERPRINTS
from pytest_vram.options import Settings
from pytest_vram.report import Summary, junit_properties, write_benchmark_json, write_json
from pytest_vram.result import GIB, MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.verdict import Budget, CaseVerdict, judge
from pytest_vram.worker import Job, Worker

__all__ = ["VramSession", "baseline_key"]

_PROPERTY: Final = "vram"


def baseline_key(item: pytest.Item, rootpath: Path) -> tuple[str, str]:
    """(module, test): the test file's path from the rootdir, with ``/``, and the rest of the
    node id. Inside the rootdir that path is the node id's own. Outside it, pytest's node id is
    relative to the argument that named the file ("" for the file itself), so two files could
    share one baseline file and a refresh of one dropped the other's entries as unused. A
    ``..`` path is one per file, the same however the file is named, and the same on another
    checkout of the same layout, which a hash of the absolute path would not be; the store
    keeps it inside the device folder (BaselineStore.path_for)."""
    try:
        module = Path(os.path.relpath(item.path, rootpath)).as_posix()
    except ValueError:  # Windows, another drive: no relative path; "C:" becomes a name of its own
        module = item.path.as_posix()
    return module, _test_id(item.nodeid)


def _test_id(nodeid: str) -> str:
    return nodeid.partition("::")[2]


@final
class VramSession:
    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.measured: dict[tuple[str, str, tuple[str, ...]], MemoryResult] = {}
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
        # Invalid baseline entries a refresh replaced or kept: "<file>: <test> / <label>: <why>"
        self.invalid: dict[str, list[str]] = {"replaced": [], "kept": []}
        self.devices: set[str] = set()
        # Host baselines need no probe of the device; cuda fingerprints come with the first result.
        if settings.device in FIXED_FINGERPRINTS:
            self.devices.add(FIXED_FINGERPRINTS[settings.device])

    @functools.cached_property
    def _tmp(self) -> str:
        """Cases' snapshots until kept or dropped, and the fake meter's traces: removed at the end."""
        return tempfile.mkdtemp(prefix="pytest-vram-")

    def job(self, meter: str, **fields: Any) -> Job:
        options: dict[str, Any] = {}
        if self.settings.snapshots != "none":
            options["snapshot_dir"] = os.path.join(self._tmp, "snapshots")
        if meter == "fake":  # its ZeRO cases of one step share a trace (zero.traces)
            options["trace_dir"] = os.path.join(self._tmp, "traces")
        if meter == "cuda":
            options["peak_source"] = self.settings.peak_source
        return Job(meter, meter_options=options, **fields)

    def keep_snapshot(self, result: MemoryResult, failed: bool) -> str | None:
        """A case's memory snapshot is kept in the report's folder when it failed (or with
        --vram-snapshots=all); otherwise it is dropped."""
        path = Path(result.snapshot_path) if result.snapshot_path else None
        if path is None or not path.exists():
            return None
        if not failed and self.settings.snapshots != "all":
            path.unlink()
            return None
        target = self.settings.snapshots_dir / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        return str(target)

    @functools.cached_property
    def worker(self) -> Worker:
        return Worker(self.worker_meter)  # started by the first case, not before

    def store(self, device: str) -> BaselineStore:
        if device not in self._stores:
            # Under --vram-update an invalid entry reads as missing: its test records anew.
            self._stores[device] = BaselineStore(
                self.settings.baselines_dir, device, replace_invalid=self.settings.update
            )
        return self._stores[device]

    # -- collection -------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: deselected tests are not "unused"
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            module, test = baseline_key(item, self.config.rootpath)
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
                # Kept for the test's setup: a usage error here would stop every other test,
                # and fail tests that -k deselects.
                item.stash[MARKER_ERROR] = f"{item.nodeid}: @pytest.mark.{MARKER}: {exc}"
                continue
            if args.device == "cuda":
                self.worker_meter = "cuda"
            if "model" in args.spec_defaults:  # a whole spec: the meter can be asked now
                meter = args.device or self.settings.device
                reason = unsupported(meter, StepSpec.from_kwargs(**args.spec_defaults))
                if reason:
                    item.stash[MARKER_ERROR] = f"{item.nodeid}: @pytest.mark.{MARKER}: {reason}"

    @pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up for nothing
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        error = item.stash.get(MARKER_ERROR, None)
        if error is not None:
            pytest.fail(error, pytrace=False)

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
                    f"marked {MARKER}(gb={args.budget_bytes / GIB:g}) but measured nothing: "  # type: ignore[union-attr]
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
            # junit XML writes the item's properties, from the teardown report.
            suffix = f"[{verdict.result.label}]" if len(verdicts) > 1 else ""
            item.user_properties.extend(junit_properties(row, suffix))
            reasons.extend(verdict.reasons)
            reasons.extend(verdict.details)
            if snapshot:
                line = (
                    f"memory snapshot of [{verdict.result.label}]: {snapshot} "
                    "(open it in https://pytorch.org/memory_viz)"
                )
                # A passing case's snapshot (--vram-snapshots=all) is named in its report
                # section; only a failure's is one of the reasons it failed.
                if verdict.failed:
                    reasons.append(line)
                else:
                    report.sections.append((f"vram snapshot {verdict.result.label}", line))
        if reasons and report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(reasons)
        elif reasons:
            # The test's own assert failed: the verdict's findings are shown beside its message.
            report.sections.append(("vram verdict", "\n".join(reasons)))
        return report

    def _judge(
        self,
        item: pytest.Item,
        args: MarkerArgs | None,
        results: list[MemoryResult],
        completed: bool,
    ) -> list[CaseVerdict]:
        module, test = baseline_key(item, self.config.rootpath)
        tolerance = (
            args.tolerance if args and args.tolerance is not None else self.settings.tolerance
        )
        leak = args.leak_tolerance if args else 0.0
        budget = Budget(args.budget_bytes if args else None, tolerance, leak)
        # A path from the rootdir, as pytest takes it there: an outside file's node id is not.
        hint = f"pytest-vram refresh '{module}::{test}'"
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
            stored = self._stored(result.device, module, test) if baseline is None else {}
            verdict = judge(
                item.nodeid,
                result,
                budget,
                baseline,
                strict=self.settings.strict,
                update=self.settings.update,
                record_hint=hint,
                capacity_bytes=capacities[index] if index < len(capacities) else None,
                stored=stored,
                calibrate=self.settings.calibrate,
            )
            verdicts.append(verdict)
            if self.settings.update:
                self.pending[(result.device, module)].setdefault(test, {})[label] = (
                    result.baseline_dict()
                )
            if completed:
                self.ran[(result.device, module)].setdefault(test, set()).add(label)
        return verdicts

    def _stored(self, device: str, module: str, test: str) -> dict[str, int]:
        """The peaks of ``test``'s baseline entries, by label (none when the file is bad)."""
        try:
            cases = self.store(device).load(module).get(test, {})
        except BaselineError:
            return {}
        return {label: int(entry["peak_bytes"]) for label, entry in cases.items()}

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
                    tests.add(_test_id(child.nodeid))
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
                store = self.store(device)
                try:
                    merge = store.write(module, self.pending.get(key, {}), unused.get(key, {}))
                except BaselineError as exc:
                    self.errors.append(str(exc))
                    continue
                path = store.path_for(module)
                if path.is_relative_to(self.config.rootpath):
                    path = path.relative_to(self.config.rootpath)
                self.invalid["replaced"].extend(i.line(path) for i in merge.replaced)
                self.invalid["kept"].extend(i.line(path) for i in merge.kept)
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller prints the summary
            workeroutput["vram_unused"] = self.summary.unused
            workeroutput["vram_errors"] = self.errors
            workeroutput["vram_invalid"] = self.invalid
        if "_tmp" in vars(self):  # made by the first case
            shutil.rmtree(self._tmp, ignore_errors=True)
        if workeroutput is None and self.settings.json_path is not None:
            try:
                write_json(self.settings.json_path, self.summary, self.errors)
            except OSError as exc:
                self.errors.append(f"--vram-json: cannot write {self.settings.json_path}: {exc}")
        benchmark = self.settings.benchmark_json_path
        if workeroutput is None and benchmark is not None:
            try:
                write_benchmark_json(benchmark, self.summary)
            except OSError as exc:
                self.errors.append(f"--vram-benchmark-json: cannot write {benchmark}: {exc}")
        html = self.settings.html_path
        if workeroutput is None and html is not None:
            self._write_html(html)
        if self.errors:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _write_html(self, path: Path) -> None:
        try:
            from pytest_vram import html_report
        except ImportError as exc:  # the report extra (its plotting library) is not installed
            self.errors.append(f"--vram-html: {exc}")
            return
        try:
            html_report.write_html(path, self.summary.rows, self.errors)
        except OSError as exc:
            self.errors.append(f"--vram-html: cannot write {path}: {exc}")

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {})
        for line in output.get("vram_unused", []):
            if line not in self.summary.unused:
                self.summary.unused.append(line)
        self.errors.extend(e for e in output.get("vram_errors", []) if e not in self.errors)
        for kind, lines in output.get("vram_invalid", {}).items():
            self.invalid[kind].extend(line for line in lines if line not in self.invalid[kind])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        try:
            lines = list(self.summary.lines(Summary.terminal_width(self.config)))
        except Exception as exc:  # the summary never breaks the run
            lines = [f"pytest-vram could not render its summary: {exc!r}"]
        # Another xdist worker may have replaced an entry this one kept: the file has the new one.
        replaced = self.invalid["replaced"]
        kept = [line for line in self.invalid["kept"] if line not in replaced]
        if lines or self.errors or replaced or kept:
            terminalreporter.section("vram")
            for line in lines:
                terminalreporter.write_line(line)
            for line in replaced:
                terminalreporter.write_line(f"replaced invalid entry {line}")
            for line in kept:
                terminalreporter.write_line(
                    f"kept invalid entry {line} (not re-measured, left as it is: fix it, or "
                    "refresh its test)",
                    yellow=True,
                )
            for error in self.errors:
                terminalreporter.write_line(f"ERROR: {error}", red=True)
