"""Detection score of the shipped suite: each bug of ``suites/regressions/`` planted in turn.

The suite files run once clean, then once per planted bug (``--vram-import
suites.regressions.<name>`` in every case's worker child), against the committed baselines. For
each bug: caught or not, by which tests, the first line of each failure, and the run time; for
the bugs the fake meter can see, the same at real size (``suites/test_gallery_real_size.py``,
Qwen2.5-7B; ``suites/test_references.py`` for QLoRA). DeepSpeed's engine does not run under the
fake meter (ZeRO is simulated there), so its bugs are planted on the host meter only.

    python benchmarks/regression_gallery.py                 # each bug in its files, ~30-40 min on 2 cores
    python benchmarks/regression_gallery.py --full          # each bug in the whole of suites/
    python benchmarks/regression_gallery.py --only lora_input_copy --no-real-size

Runs are in this process (``pytest.main``), so the worker's preloaded server is started once;
each run's terminal output goes to a log file under ``--logs``. ``tests/test_regression_gallery.py``
is the CI-sized gallery: each bug on the few tests that must catch it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # suites.regressions, here and in the cases' children

from suites.regressions import GALLERY, Plant  # noqa: E402

FAKE_BLIND = "not planted: DeepSpeed does not run under the fake meter (ZeRO is simulated)"


@dataclasses.dataclass
class Run:
    seconds: float
    failed: dict[str, str]  # node id -> first line of its failure
    passed: int
    log: Path


class _Collector:
    """Failed tests and their first lines, from the run's own reports."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}
        self.passed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.nodeid not in self.failed:
            self.failed[report.nodeid] = first_line(report)
        elif report.passed and report.when == "call":
            self.passed += 1


def first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else report.longreprtext
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def run(paths: list[str], plant: Plant | None, logs: Path, tag: str) -> Run:
    args = ["-p", "no:cacheprovider", "-q", "--vram-snapshots=none", *paths]
    if plant is not None:
        args += ["--vram-import", plant.name]
    collector = _Collector()
    log = logs / f"{tag}.log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        with contextlib.redirect_stderr(out):
            pytest.main(args, plugins=[collector])
    return Run(time.perf_counter() - start, collector.failed, collector.passed, log)


def _files(plant: Plant, full: bool, real_size: bool) -> tuple[list[str], list[str]]:
    host = ["suites"] if full else list(plant.files)
    fake = [f for f in plant.real_size if f not in host] if real_size else []
    return host, fake


def _caught(planted: Run, clean: Run) -> dict[str, str]:
    """Failures the plant caused: not the ones the clean run had already."""
    return {k: v for k, v in planted.failed.items() if k not in clean.failed}


def _print_plant(
    plant: Plant, host: dict[str, str], fake: dict[str, str] | None, secs: float
) -> None:
    verdict = "CAUGHT" if host or fake else "MISSED"
    print(f"\n## {plant.module}: {verdict} ({secs:.0f} s)")
    print(f"   {plant.bug_class} [{plant.library}; {', '.join(plant.threads)}]")
    missing = [n for n in plant.caught_by if n not in host]
    for nodeid, line in host.items():
        print(f"   - {nodeid}\n       {line}")
    if missing:
        print(f"   expected but passing: {', '.join(missing)}")
    if fake is None:
        print(f"   real size: {FAKE_BLIND}" if plant.library == "DeepSpeed" else "   real size: -")
    elif fake:
        for nodeid, line in fake.items():
            print(f"   - real size: {nodeid}\n       {line}")
    else:
        print("   real size: not caught")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="each bug in the whole of suites/")
    parser.add_argument("--only", nargs="*", default=None, help="plant module names")
    parser.add_argument("--no-real-size", action="store_true", help="skip the fake meter")
    parser.add_argument("--logs", type=Path, default=None, help="folder for the runs' output")
    args = parser.parse_args()
    os.chdir(ROOT)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="regression-gallery-"))
    logs.mkdir(parents=True, exist_ok=True)
    plants = [p for p in GALLERY if args.only is None or p.module in args.only]
    real_size = not args.no_real_size
    begin = time.perf_counter()

    every: list[str] = []
    for plant in plants:
        host, fake = _files(plant, args.full, real_size)
        every += [f for f in (*host, *fake) if f not in every]
    clean = run(every, None, logs, "clean")
    print(f"clean run: {clean.passed} passed, {len(clean.failed)} failed, {clean.seconds:.0f} s")
    for nodeid, line in clean.failed.items():  # not counted as catches below
        print(f"   already failing: {nodeid}\n       {line}")

    rows: list[tuple[Plant, dict[str, str], dict[str, str] | None, float]] = []
    for plant in plants:
        host_files, fake_files = _files(plant, args.full, real_size)
        planted = run(host_files, plant, logs, plant.module)
        host = _caught(planted, clean)
        fake: dict[str, str] | None = None
        seconds = planted.seconds
        if fake_files:
            at_size = run(fake_files, plant, logs, f"{plant.module}-real-size")
            fake, seconds = _caught(at_size, clean), seconds + at_size.seconds
        elif plant.real_size and not real_size:
            fake = {}
        # A real-size file already among the host files: its failures are the real-size ones.
        for nodeid in [n for n in host if any(n.startswith(f) for f in plant.real_size)]:
            fake = fake if fake is not None else {}
            fake[nodeid] = host.pop(nodeid)
        rows.append((plant, host, fake, seconds))
        _print_plant(plant, host, fake, seconds)

    caught = sum(1 for _, host, fake, _ in rows if host or fake)
    print(f"\n# detection score: {caught} of {len(rows)} planted bugs caught")
    print(f"# clean run {clean.seconds:.0f} s; total {time.perf_counter() - begin:.0f} s")
    print("\n| bug | class | threads | caught | tests failing | expected tests | first line |")
    print("|---|---|---|---|---|---|---|")
    for plant, host, fake, _ in rows:
        expected = [n for n in plant.caught_by if n in host]
        shown = expected[0] if expected else next(iter({**host, **(fake or {})}), None)
        first = ({**host, **(fake or {})}.get(shown, "-") if shown else "-").replace("|", "/")
        count = f"{len(host)} + {len(fake)} at real size" if fake else f"{len(host)}"
        print(
            f"| {plant.module} | {plant.bug_class} | {', '.join(plant.threads)} | "
            f"{'yes' if host or fake else 'no'} | {count} | "
            f"{len(expected)} of {len(plant.caught_by)} | {shown}: {first} |"
        )
    print(f"\nlogs: {logs}")


if __name__ == "__main__":
    main()
