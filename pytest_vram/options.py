"""Command-line options and their ini twins, resolved in one place.

Each option ``--vram-x`` has the ini key ``vram_x`` (``--gpu`` has ``gpu``). CLI defaults are
``None`` so the ini value is read when the option is not given; a bad value from either source
is a usage error that names the option and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, final

import pytest

from pytest_vram.errors import SpecError
from pytest_vram.meters import METERS
from pytest_vram.result import PEAK_SOURCES
from pytest_vram.units import parse_fraction

__all__ = ["Settings", "add_options", "resolve"]


def _tolerance(text: str, flag: str = "--vram-tolerance") -> float:
    """A fraction (0.05) or a percentage ("5%"); a fraction above 1 is refused, so that
    ``--vram-tolerance 5`` is never silently 500%."""
    try:
        return parse_fraction(flag, text)
    except SpecError as exc:
        # A ValueError from a type= callable would become argparse's "invalid value" text.
        raise pytest.UsageError(str(exc)) from None


# The worker waits for a case with multiprocessing.connection.wait, whose poll takes a C int of
# milliseconds (at most 24.8 days; 1e7 s raised OverflowError in every case); no case should
# run for a week.
MAX_TIMEOUT_S: Final = 7 * 24 * 3600


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"--vram-timeout={text!r} is not a number of seconds") from None
    if math.isnan(value) or value <= 0:
        raise pytest.UsageError(f"--vram-timeout={text!r} must be a number of seconds > 0")
    if value > MAX_TIMEOUT_S:
        raise pytest.UsageError(
            f"--vram-timeout={text!r} is more than a week: at most {MAX_TIMEOUT_S} seconds"
        )
    return value


def _mib(flag: str) -> Callable[[str], float]:
    """A number of MiB >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise pytest.UsageError(f"{flag}={text!r} is not a number of MiB") from None
        if not value >= 0 or math.isinf(value):
            raise pytest.UsageError(f"{flag}={text!r} must be a number of MiB >= 0")
        return value

    return parse


def _path_option(flag: str) -> Callable[[str], str]:
    """A folder or file name: one the OS can take (a NUL byte ends every path call)."""

    def parse(text: str) -> str:
        if "\0" in text:
            raise pytest.UsageError(f"{flag}={text!r}: a path cannot hold a NUL byte")
        return text

    return parse


def _choice(flag: str, choices: Sequence[str], fold: bool = False) -> Callable[[str], str]:
    """One of ``choices``; ``fold``: as written in any case, with spaces around."""

    def parse(text: str) -> str:
        value = str(text).strip().lower() if fold else text
        if value not in choices:
            raise pytest.UsageError(f"{flag}={text!r}; choose one of: {', '.join(choices)}")
        return value

    return parse


def _modules(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(",", " ").split() if n)
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise pytest.UsageError(f"--vram-import: {name!r} is not a module name")
    return names


SNAPSHOT_MODES: Final = ("failed", "all", "none")


def _flag(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise pytest.UsageError(f"expected true or false, got {text!r}")


@final
@dataclasses.dataclass(frozen=True)
class _Option:
    flag: str
    help: str
    parse: Callable[[str], Any]
    default: Any
    is_flag: bool = False

    @property
    def ini(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def dest(self) -> str:
        return self.ini


OPTIONS: Final = (
    _Option(
        "--gpu",
        "measure on the GPU (cuda meter); an error when no GPU is visible",
        _flag,
        False,
        True,
    ),
    _Option(
        "--vram-device",
        f"meter to use: {', '.join(METERS)} (default: cuda with --gpu, else host)",
        _choice("--vram-device", METERS),
        None,
    ),
    _Option(
        "--vram-update",
        "record the measured cases as the new baselines and pass them",
        _flag,
        False,
        True,
    ),
    _Option(
        "--vram-strict",
        "also fail when a peak drops below its baseline beyond tolerance",
        _flag,
        False,
        True,
    ),
    _Option(
        "--vram-baselines",
        "baselines directory, relative to the rootdir (default: baselines)",
        _path_option("--vram-baselines"),
        "baselines",
    ),
    _Option(
        "--vram-tolerance",
        "default allowed drift from the baseline: a fraction of 1 or less, e.g. 0.05, or a "
        "percentage, e.g. 5% (default 0.05)",
        _tolerance,
        0.05,
    ),
    _Option(
        "--vram-timeout",
        "seconds a case may run before it is killed "
        f"(default 600; at most {MAX_TIMEOUT_S}, a week)",
        _timeout,
        600.0,
    ),
    _Option(
        "--vram-peak-source",
        "GPU number the budget checks: allocated (torch tensors), reserved (torch's caching "
        "allocator, default) or nvml (the process's device memory, as nvidia-smi shows it)",
        _choice("--vram-peak-source", PEAK_SOURCES),
        "reserved",
    ),
    _Option(
        "--vram-benchmark-json",
        "write each case's peak to this file in github-action-benchmark's "
        "customSmallerIsBetter format (bytes), to chart memory over commits",
        _path_option("--vram-benchmark-json"),
        None,
    ),
    _Option(
        "--vram-json",
        "write every measured case (result, verdict, baseline) to this JSON file; kept memory "
        "snapshots go to a snapshots/ folder beside it",
        _path_option("--vram-json"),
        None,
    ),
    _Option(
        "--vram-html",
        "write a self-contained HTML report of every case (breakdown at the peak, baseline "
        "and budget, ranks, memory over the step) to this file; needs the report extra",
        _path_option("--vram-html"),
        None,
    ),
    _Option(
        "--vram-snapshots",
        "memory snapshots for https://pytorch.org/memory_viz, from every meter: kept for "
        "failed cases (default), all cases, or none (not recorded: a little faster)",
        _choice("--vram-snapshots", SNAPSHOT_MODES, fold=True),
        "failed",
    ),
    _Option(
        "--vram-calibrate",
        "also trace every case on the fake meter and fail a case whose prediction is off "
        "the measured number by more than this: a fraction, e.g. 0.1, or a percentage, e.g. "
        "10% (with --gpu the prediction is traced and shown anyway)",
        functools.partial(_tolerance, flag="--vram-calibrate"),
        None,
    ),
    _Option(
        "--vram-cuda-context-mib",
        "MiB the CUDA context holds per GPU process, for the nvml prediction (default 426, a "
        "bare context as published; the summary prints what your GPU cases measured)",
        _mib("--vram-cuda-context-mib"),
        None,
    ),
    _Option(
        "--vram-nccl-mib",
        "MiB NCCL's buffers hold per GPU of a multi-rank case, for the nvml prediction "
        "(default 544 for 2 ranks, 688 for more, as measured on 4 x A100 with NVLink)",
        _mib("--vram-nccl-mib"),
        None,
    ),
    _Option(
        "--vram-import",
        "modules each case's worker child imports before the step, comma-separated: "
        "patches of the training stack, method registrations",
        _modules,
        (),
    ),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("vram", "GPU memory budgets and baselines (pytest-vram)")
    for opt in OPTIONS:
        cli_help = opt.help.replace("%", "%%")  # argparse %-formats its help texts; ini does not
        if opt.is_flag:
            group.addoption(
                opt.flag, action="store_true", dest=opt.dest, default=None, help=cli_help
            )
        else:
            group.addoption(
                opt.flag, action="store", dest=opt.dest, default=None, type=opt.parse, help=cli_help
            )
        parser.addini(opt.ini, help=f"{opt.help} (ini twin of {opt.flag})", default=None)


@final
@dataclasses.dataclass(frozen=True)
class Settings:
    gpu: bool
    device: str
    update: bool
    strict: bool
    baselines_dir: Path
    tolerance: float
    timeout_s: float
    imports: tuple[str, ...] = ()
    peak_source: str = "reserved"
    json_path: Path | None = None
    benchmark_json_path: Path | None = None
    html_path: Path | None = None
    snapshots: str = "failed"  # SNAPSHOT_MODES
    calibrate: float | None = None
    cuda_context_mib: float | None = None  # None: device_profile's published figure
    nccl_mib: float | None = None

    @property
    def predicts(self) -> bool:
        """Cases are also traced on the fake meter, their prediction kept beside them."""
        return self.gpu or self.calibrate is not None

    @property
    def snapshots_dir(self) -> Path:
        """Where kept memory snapshots go: beside the JSON or HTML report, else in
        .vram-report beside the baselines."""
        report = self.json_path or self.html_path
        base = report.parent if report else self.baselines_dir.parent / ".vram-report"
        return base / "snapshots"


def _value(config: pytest.Config, opt: _Option) -> Any:
    cli = config.getoption(opt.dest)
    if cli is not None:
        return cli
    ini = config.getini(opt.ini)
    if ini is None or ini == "":
        return opt.default
    try:
        return opt.parse(ini)
    except pytest.UsageError as exc:
        raise pytest.UsageError(f"ini {opt.ini} = {ini!r}: {exc}") from None


def resolve(config: pytest.Config) -> Settings:
    values = {opt.dest: _value(config, opt) for opt in OPTIONS}
    gpu = bool(values["gpu"])
    device = values["vram_device"] or ("cuda" if gpu else "host")
    if gpu and device != "cuda":
        raise pytest.UsageError(
            f"--gpu measures with the cuda meter; it conflicts with --vram-device={device}"
        )
    base = Path(values["vram_baselines"])
    return Settings(
        gpu=gpu,
        device=device,
        update=bool(values["vram_update"]),
        strict=bool(values["vram_strict"]),
        baselines_dir=base if base.is_absolute() else Path(config.rootpath) / base,
        tolerance=values["vram_tolerance"],
        timeout_s=values["vram_timeout"],
        imports=values["vram_import"],
        peak_source=values["vram_peak_source"],
        json_path=_rooted(config, values["vram_json"]) if values["vram_json"] else None,
        benchmark_json_path=(
            _rooted(config, values["vram_benchmark_json"])
            if values["vram_benchmark_json"]
            else None
        ),
        html_path=_rooted(config, values["vram_html"]) if values["vram_html"] else None,
        snapshots=values["vram_snapshots"],
        calibrate=values["vram_calibrate"],
        cuda_context_mib=values["vram_cuda_context_mib"],
        nccl_mib=values["vram_nccl_mib"],
    )


def _rooted(config: pytest.Config, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else Path(config.invocation_params.dir) / path
