"""Cases measured by one xdist worker, reused by the others of the same run.

Within a session a spec is measured once (``fixture.Recorder``); under xdist the tests that
share a spec (an invariant and the case's own test, the orderings of one model) land on
different workers, each of which would measure it again. The controller makes one folder per
run and hands it to its workers; a worker stores each result it measured there and looks there
before measuring. A worker that starts a spec before another has stored it measures it too:
nothing waits, so a slow case never holds up another worker. GPU results stay in their
worker: each worker has GPUs of its own, which need not be alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final, final

import pytest

from pytest_vram import files
from pytest_vram.result import MemoryResult

# The controller's key in each worker's ``workerinput``.
WORKER_INPUT: Final = "vram_shared_results"

Key = tuple[str, str, tuple[str, ...]]  # (meter, spec as JSON, imports), as the session's cache
_OWN_DEVICE: Final = frozenset({"cuda"})  # meters whose results are the worker's GPUs'


@final
class SharedResults:
    """One run's folder of measured results, a file per key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of_worker(cls, config: pytest.Config) -> SharedResults | None:
        """The folder the xdist controller handed this worker; None outside xdist."""
        workerinput: dict[str, Any] = getattr(config, "workerinput", {})
        path = workerinput.get(WORKER_INPUT)
        return cls(Path(path)) if path else None

    def _path(self, key: Key) -> Path:
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        return self.directory / f"{digest}.pickle"

    def get(self, key: Key) -> MemoryResult | None:
        """The result another worker stored for ``key``; None if none did (or it cannot be
        read: the worker then measures the case itself)."""
        if key[0] in _OWN_DEVICE:
            return None
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        try:
            result = pickle.loads(data)
        except Exception:  # whatever a damaged file raises: the case is measured instead
            return None
        return result if isinstance(result, MemoryResult) else None

    def put(self, key: Key, result: MemoryResult) -> None:
        """Stores ``result`` whole or not at all (written aside, then renamed). Its memory
        snapshot stays this worker's: the test that measured it keeps or drops the file."""
        if key[0] in _OWN_DEVICE:
            return
        shared = dataclasses.replace(result, snapshot_path=None)
        try:
            with files.replaced(self._path(key)) as tmp, open(tmp, "xb") as out:
                pickle.dump(shared, out)
        except OSError:
            pass  # a full or vanished folder: the other workers measure the case themselves


@final
class SharedResultsController:
    """On the xdist controller: makes the run's folder for the workers, removes it at the end."""

    def __init__(self) -> None:
        self._directory: str | None = None

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="pytest-vram-shared-")
        node.workerinput[WORKER_INPUT] = self._directory

    def pytest_unconfigure(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
