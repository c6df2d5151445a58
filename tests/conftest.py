"""Shared helpers for the plugin tests: a pytester project that records and checks baselines.

``vram_project`` works like pytest-regressions' fixtures, from the outside: write a test module,
run it with ``--vram-update`` to record its baselines, then run it again to check them. Runs are
in-process (``pytester.runpytest``); each measured case still forks the plugin's worker child.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver  # noqa: F401 - see below
import textwrap
from pathlib import Path
from typing import Any

import pytest

# Imported here, outside any pytester run: pytester restores sys.modules after each in-process
# run, and a multiprocessing.forkserver first imported inside a run would be dropped with its
# server handle, so every test would start (and pay for) a new torch-preloading server.

# The cheapest real case: tiny-llama, one sequence of 32 tokens, full fine-tuning with AdamW.
SMALL = 'model="tiny-llama", batch=1, seq=32'
LABEL = "tiny-llama full adamw bf16 b1 s32"
GIB = 2**30


def output(result: pytest.RunResult) -> str:
    """Everything the run printed, stdout then stderr."""
    return "\n".join([*result.outlines, *result.errlines])


class VramProject:
    """One pytester directory holding a test module, its rootdir ini and its baselines."""

    def __init__(self, pytester: pytest.Pytester, module: str = "test_mem") -> None:
        self.pytester = pytester
        self.module = module
        self.ini()

    @property
    def path(self) -> Path:
        return self.pytester.path

    def ini(self, **options: str) -> Path:
        """(Re)write the project's ini; it also pins the rootdir to the project directory."""
        lines = ["[pytest]", *(f"{key} = {value}" for key, value in options.items())]
        return self.pytester.makeini("\n".join(lines) + "\n")

    def write(self, source: str, name: str | None = None) -> Path:
        """Write a test module (default: the project's module); returns its path."""
        return self.pytester.makepyfile(**{name or self.module: textwrap.dedent(source)})

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest("-p", "no:cacheprovider", *args)

    def record(self, *args: str, ret: int = 0) -> pytest.RunResult:
        """Run with --vram-update and check the run ended with ``ret``."""
        result = self.run("--vram-update", *args)
        assert result.ret == ret, output(result)
        return result

    def record_then_check(
        self, source: str, *args: str
    ) -> tuple[pytest.RunResult, pytest.RunResult]:
        """Write ``source``, record its baselines, then rerun it the ordinary way."""
        self.write(source)
        recorded = self.record(*args)
        return recorded, self.run(*args)

    # -- baseline files ---------------------------------------------------------------------

    def baseline_path(self, module: str | None = None, folder: str = "baselines") -> Path:
        return self.path / folder / "host-cpu" / f"{module or self.module}.json"

    def baseline(self, module: str | None = None, folder: str = "baselines") -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.baseline_path(module, folder).read_text("utf-8"))
        return doc

    def entry(self, test: str, label: str = LABEL) -> dict[str, Any]:
        entry: dict[str, Any] = self.baseline()["entries"][test][label]
        return entry

    def edit_entry(
        self,
        test: str,
        label: str = LABEL,
        *,
        peak_factor: float = 1.0,
        versions: dict[str, str] | None = None,
    ) -> int:
        """Scale the stored peak of one case (and patch its versions); returns the new peak."""
        path = self.baseline_path()
        doc = json.loads(path.read_text("utf-8"))
        entry = doc["entries"][test][label]
        entry["peak_bytes"] = int(entry["peak_bytes"] * peak_factor)
        entry["versions"].update(versions or {})
        path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n", encoding="utf-8")
        return int(entry["peak_bytes"])


@pytest.fixture
def vram_project(pytester: pytest.Pytester) -> VramProject:
    return VramProject(pytester)


# -- tests that need a real GPU run only under --gpu ------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a visible GPU; runs only under --gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from pytest_vram.plugin import SESSION

    if config.stash[SESSION].settings.gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU: run with --gpu")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
