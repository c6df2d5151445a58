"""pytest hooks only: options, marker registration, the session object and the fixture."""

from __future__ import annotations

from typing import Final

import pytest

from pytest_vram import methods
from pytest_vram.fixture import Recorder
from pytest_vram.gpus import assign_gpus, check_gpu_visible, check_workers
from pytest_vram.marker import help_line
from pytest_vram.options import add_options, resolve
from pytest_vram.session import VramSession
from pytest_vram.shared_results import SharedResults, SharedResultsController

SESSION: Final = pytest.StashKey[VramSession]()
SHARED: Final = pytest.StashKey[SharedResults | None]()
_REGISTRY: Final = pytest.StashKey[methods.Snapshot]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Before conftests run: what they register is this session's, undone at unconfigure.
    early_config.stash[_REGISTRY] = methods.snapshot()


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_REGISTRY, None)
    if saved is not None:
        methods.restore(saved)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", help_line())
    settings = resolve(config)
    if settings.gpu and not hasattr(config, "workerinput"):
        check_gpu_visible()
        check_workers(getattr(config.option, "numprocesses", None) or 0)
    session = VramSession(config, settings)
    if settings.gpu:
        session.gpu_devices = assign_gpus(getattr(config, "workerinput", None))
    config.stash[SESSION] = session
    config.pluginmanager.register(session, "vram-session")
    # xdist workers reuse each other's cases through a folder their controller makes.
    config.stash[SHARED] = SharedResults.of_worker(config)
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(SharedResultsController(), "vram-shared-results")


@pytest.fixture
def vram(request: pytest.FixtureRequest) -> Recorder:
    """Measure training steps: ``vram.step(model=..., method=...)`` or ``vram.measure(fn, ...)``."""
    config = request.config
    return Recorder(config.stash[SESSION], request.node, config.stash[SHARED])
