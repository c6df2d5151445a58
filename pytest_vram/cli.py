"""``pytest-vram refresh [pytest args]``: re-record baselines and print what changed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import pytest

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


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(
        prog="pytest-vram", description="GPU memory budgets and baselines for fine-tuning steps"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser(
        "refresh",
        help="run tests with --vram-update and print created/updated/unchanged/unused counts",
    )
    ref.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest as is")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        return refresh(args.pytest_args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse catches it


if __name__ == "__main__":
    sys.exit(main())
