"""``pytest-vram refresh [pytest args]``: re-record baselines and print what changed.
``pytest-vram build-ops``: build the DeepSpeed ops ZeRO cases load, once, before timed cases.
``pytest-vram estimate MODEL [options]``: trace one step on the fake meter (``estimate_cli``).
``pytest-vram diff OLD [NEW]`` / ``show [PATH]``: stored baselines for review (``review``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import pytest

from pytest_vram import __version__, estimate_cli
from pytest_vram.errors import SpecError, extra, missing_library

__all__ = ["main"]


class _Counts:
    """Picks up the run's summary before pytest tears the config down."""

    def __init__(self) -> None:
        self.line: str | None = None

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        from pytest_vram.plugin import SESSION

        session = config.stash.get(SESSION, None)
        if session is not None:
            self.line = session.summary.count_line()


def refresh(pytest_args: Sequence[str]) -> int:
    counts = _Counts()
    code = pytest.main([*pytest_args, "--vram-update"], plugins=[counts])
    if counts.line is not None:
        print(f"pytest-vram refresh: {counts.line}")
    return int(code)


def build_ops() -> int:
    try:
        from pytest_vram.zero.ops import build_ops as build
    except ImportError as exc:
        print(f"pytest-vram build-ops: {exc}", file=sys.stderr)
        return 1
    try:
        names = build()
    except ImportError:
        missing = missing_library("deepspeed", extra("zero"))
        print(f"pytest-vram build-ops: {missing}", file=sys.stderr)
        return 1
    print(f"pytest-vram build-ops: {', '.join(names) or 'nothing to build on this accelerator'}")
    return 0


_ESTIMATE_HELP = (
    "trace one training step of a zoo model or a config.json on the fake meter; print its "
    "breakdown beside DeepSpeed's estimator and LLaMA-Factory's table"
)


class _OneLineErrors(argparse.ArgumentParser):
    """estimate's bad arguments: one line on stderr and status 2, as its other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _estimate(args: Sequence[str]) -> int:
    parser = _OneLineErrors(prog="pytest-vram estimate", description=_ESTIMATE_HELP)
    estimate_cli.add_arguments(parser)
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exc:  # a bad argument (2) or --help (0): a status, for main's callers
        return exc.code if isinstance(exc.code, int) else 2
    return estimate_cli.command(parsed)


_DIFF_HELP = (
    "compare two sides' stored baselines (a folder, or a git revision read with git show): "
    "every case that moved, with what moved in it, then added and removed cases; status 1 "
    "when a case grew beyond the tolerance"
)
_SHOW_HELP = "print the stored cases of a baselines folder (or a git revision) as a table"


def _review_arguments(parser: argparse.ArgumentParser, diff: bool) -> None:
    from pytest_vram.review import DEFAULT_FOLDER

    if diff:
        parser.add_argument("old", help="a baselines folder or a git revision (e.g. main)")
        parser.add_argument("new", nargs="?", default=DEFAULT_FOLDER, help="default: baselines")
        parser.add_argument(
            "--tolerance", default="0.05", help="growth that fails: 0.05 or 5%% (default 0.05)"
        )
    else:
        parser.add_argument("side", nargs="?", default=DEFAULT_FOLDER, help="default: baselines")
    parser.add_argument(
        "--folder", default=DEFAULT_FOLDER, help="the baselines folder within a git revision"
    )


def _review(command: str, args: Sequence[str]) -> int:
    from pytest_vram import review
    from pytest_vram.baselines import BaselineError
    from pytest_vram.units import parse_fraction

    prog = f"pytest-vram {command}"
    parser = _OneLineErrors(prog=prog, description=_DIFF_HELP if command == "diff" else _SHOW_HELP)
    _review_arguments(parser, command == "diff")
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if command == "show":
            lines, status = review.show(review.load(parsed.side, parsed.folder)), 0
        else:
            tolerance = parse_fraction("--tolerance", parsed.tolerance)
            old = review.load(parsed.old, parsed.folder)
            new = review.load(parsed.new, parsed.folder)
            lines, grew = review.diff(old, new, tolerance)
            status = 1 if grew else 0
    except (BaselineError, SpecError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return status


def main(argv: Sequence[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["refresh"]:
        # Everything after the command goes to pytest untouched, options included.
        return refresh(args[1:])
    if args == ["build-ops"]:
        return build_ops()
    if args[:1] == ["estimate"]:
        return _estimate(args[1:])
    if args[:1] in (["diff"], ["show"]):
        return _review(args[0], args[1:])
    parser = argparse.ArgumentParser(
        prog="pytest-vram", description="GPU memory budgets and baselines for fine-tuning steps"
    )
    parser.add_argument("--version", action="version", version=f"pytest-vram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "refresh",
        help="run pytest with --vram-update and the given arguments; print "
        "created/updated/unchanged/unused counts",
    )
    sub.add_parser(
        "build-ops",
        help="build the DeepSpeed ops ZeRO cases load (cached in TORCH_EXTENSIONS_DIR)",
    )
    estimate_cli.add_arguments(sub.add_parser("estimate", help=_ESTIMATE_HELP))
    _review_arguments(sub.add_parser("diff", help=_DIFF_HELP), diff=True)
    _review_arguments(sub.add_parser("show", help=_SHOW_HELP), diff=False)
    parser.parse_args(args)  # the commands only reach here for help, or with a bad command
    return 2


if __name__ == "__main__":
    sys.exit(main())
