"""Project-wide test setup: tests that need a real GPU run only under ``--gpu``."""

from __future__ import annotations

import pytest


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
