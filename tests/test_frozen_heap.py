"""A worker server freezes what its preload made, so a case's collections skip those objects."""

from __future__ import annotations

from pathlib import Path

from pytest_vram.preload import preload_modules
from pytest_vram.worker import Job, Worker


def _collector_seen(path: str) -> None:
    import gc

    class Cycle:
        pass

    cycle = Cycle()
    cycle.self = cycle  # type: ignore[attr-defined]
    del cycle
    found = gc.collect()
    Path(path).write_text(f"{gc.get_freeze_count()} {int(gc.isenabled())} {found}")


def test_a_case_starts_with_the_preloads_objects_frozen_and_collects_its_own(
    tmp_path: Path,
) -> None:
    out = tmp_path / "seen.txt"
    result = Worker("host").run(Job("host", fn=_collector_seen, args=(str(out),)), timeout_s=300)
    assert type(result).__name__ == "MemoryResult", result
    frozen, enabled, found = (int(x) for x in out.read_text().split())
    # Importing torch and transformers alone leaves hundreds of thousands of objects.
    assert frozen > 100_000
    assert enabled == 1
    assert found >= 1  # the case's own cycle is still collected


def test_the_heap_is_frozen_after_every_other_preloaded_import() -> None:
    for meter in ("host", "cuda"):
        modules = preload_modules(meter)
        assert modules[-1] == "pytest_vram.frozen_heap"
        assert modules.count("pytest_vram.frozen_heap") == 1
