"""pytest hooks only: options, marker registration, the session object and the fixture."""

from __future__ import annotations

from typing import Final

import pytest

from pytest_vram.marker import MARKER
from pytest_vram.options import add_options, resolve
from pytest_vram.session import Recorder, VramSession, check_gpu_visible

SESSION: Final = pytest.StashKey[VramSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(gb, tolerance=None, leak_tolerance=0, **step): fail when the peak memory of the test's "
        "vram.step()/vram.measure() cases exceeds gb GiB or drifts from the stored baseline",
    )
    settings = resolve(config)
    if settings.gpu and not hasattr(config, "workerinput"):
        check_gpu_visible()
    session = VramSession(config, settings)
    config.stash[SESSION] = session
    config.pluginmanager.register(session, "vram-session")


@pytest.fixture
def vram(request: pytest.FixtureRequest) -> Recorder:
    """Measure training steps: ``vram.step(model=..., method=...)`` or ``vram.measure(fn, ...)``."""
    return Recorder(request.config.stash[SESSION], request.node)
