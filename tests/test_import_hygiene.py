"""A module first imported inside a meter is imported unmeasured (``meters.imports``): the
tensors it makes at import are the library's, counted once the step uses them, as those of a
module imported before the meter are; under the fake meter they are real tensors, so the
module works after the trace."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from pytest_vram.meters.base import Roles
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.meters.host import HostMeter

_names = itertools.count()


def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new module, never imported, that makes a 4,000-byte table at import and imports a
    second new module that makes 400 bytes more."""
    n = next(_names)
    inner, outer = f"vram_probe_inner_{n}", f"vram_probe_outer_{n}"
    (tmp_path / f"{inner}.py").write_text("import torch\nSMALL = torch.ones(100)\n")
    (tmp_path / f"{outer}.py").write_text(
        f"import torch\nimport {inner}\nTABLE = torch.ones(1000)\nSMALL = {inner}.SMALL\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return outer


def _step(meter: HostMeter | FakeMeter, module_name: str, import_inside: bool) -> int:
    module = None if import_inside else importlib.import_module(module_name)
    with meter:
        meter.step_begin()
        if module is None:
            module = importlib.import_module(module_name)
        x = torch.ones(10)
        y = x * 2  # seen after the import: the ledger is not left paused
        used = module.TABLE + 1  # the table counts once used, as any early tensor does
        measure = meter.step_end(Roles(params=[], buffers=[], grads=[], optimizer=[x, y, used]))
    assert not isinstance(module.TABLE, FakeTensor) and not isinstance(module.SMALL, FakeTensor)
    assert float(module.TABLE.sum()) == 1000.0  # a real tensor, usable after the meter
    return measure.peak_bytes


@pytest.mark.parametrize("meter", [HostMeter, FakeMeter])
def test_a_module_imported_inside_measures_as_one_imported_before(
    meter: type[HostMeter] | type[FakeMeter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = _step(meter(), probe_module(tmp_path, monkeypatch), import_inside=True)
    before = _step(meter(), probe_module(tmp_path, monkeypatch), import_inside=False)
    # x and y (40 B each), the table once used (4,000 B) and the sum (4,000 B); SMALL, made
    # by the nested import and never used, not at all.
    assert inside == before == 40 + 40 + 4000 + 4000


def test_an_import_inside_a_paused_stretch_leaves_it_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = probe_module(tmp_path, monkeypatch)
    bootstrap = importlib.import_module("importlib._bootstrap")
    original = bootstrap._find_and_load
    meter = HostMeter()
    with meter:
        assert bootstrap._find_and_load is not original
        meter.step_begin()
        with meter.paused():
            importlib.import_module(name)
            unseen = torch.ones(1000)
        assert meter.ledger.live_bytes == 0
        seen = torch.ones(10)
        assert meter.ledger.live_bytes == 40
        del unseen, seen
    assert bootstrap._find_and_load is original  # the import machinery restored on exit
