"""The regression gallery in CI: the shipped suite catches each planted bug, by the right tests,
with a message that names what moved.

Each bug of ``suites/regressions/`` is planted with ``--vram-import`` in the worker children of
a run of the tests that must catch it (``Plant.ci``), against the committed host baselines;
the same tests run once without a plant, file by file, and pass. The whole suite files, the
fake meter at real size and the score are ``benchmarks/regression_gallery.py``'s.

The suite files are copied under other names (``test_zero.py`` -> ``test_zero_planted.py``,
with their baseline files): the session running this file may have imported the shipped
modules already, under their own names.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from conftest import output

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = "_planted"


@cache
def gallery() -> ModuleType:
    """``suites/regressions/__init__.py``, torch-free, loaded without putting the repository on
    ``sys.path``."""
    path = ROOT / "suites" / "regressions" / "__init__.py"
    spec = importlib.util.spec_from_file_location("_regression_gallery", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


PLANTS = gallery().GALLERY


def planted(nodeid: str) -> str:
    """The node id of a shipped test in the copied project."""
    path, _, test = nodeid.partition("::")
    return f"{path.removesuffix('.py')}{SUFFIX}.py::{test}"


def project(pytester: pytest.Pytester, nodeids: list[str]) -> None:
    """The suite files of ``nodeids``, their baselines and the plants, under the pytester dir."""
    for path in sorted({n.partition("::")[0] for n in nodeids}):
        source = ROOT / path
        target = pytester.path / path.replace(".py", f"{SUFFIX}.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        for device in ("host-cpu", "fake"):
            stored = ROOT / "baselines" / device / path.replace(".py", ".json")
            if stored.exists():
                copy = pytester.path / "baselines" / device / path.replace(".py", f"{SUFFIX}.json")
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stored, copy)
    plants = pytester.path / "suites" / "regressions"
    shutil.copytree(
        ROOT / "suites" / "regressions", plants, ignore=shutil.ignore_patterns("__pycache__")
    )
    pytester.makeini("[pytest]\nvram_baselines = baselines\n")
    # The case's child imports suites.regressions.<plant> from the sys.path it is started with.
    pytester.syspathinsert()


def run(pytester: pytest.Pytester, nodeids: list[str], *args: str) -> pytest.RunResult:
    return pytester.runpytest(
        "-p", "no:cacheprovider", "--vram-snapshots=none", *map(planted, nodeids), *args
    )


def failures(result: pytest.RunResult) -> dict[str, str]:
    """Failed test's node id -> its failure text."""
    reports = result.reprec.getfailures()  # type: ignore[attr-defined]
    return {r.nodeid: r.longreprtext for r in reports}


CLEAN = sorted({n for plant in PLANTS for n in plant.ci})


# One test per suite file, so that xdist can spread the clean runs over its workers.
@pytest.mark.parametrize("path", sorted({n.partition("::")[0] for n in CLEAN}))
def test_the_gallery_tests_pass_without_a_plant(pytester: pytest.Pytester, path: str) -> None:
    nodeids = [n for n in CLEAN if n.partition("::")[0] == path]
    project(pytester, nodeids)
    result = run(pytester, nodeids)
    assert failures(result) == {}, output(result)
    assert result.ret == 0, output(result)


@pytest.mark.parametrize("plant", PLANTS, ids=[p.module for p in PLANTS])
def test_the_suite_catches_the_planted_bug(pytester: pytest.Pytester, plant) -> None:  # type: ignore[no-untyped-def]
    project(pytester, list(plant.ci))
    result = run(pytester, list(plant.ci), "--vram-import", plant.name)
    failed = failures(result)
    assert sorted(failed) == sorted(map(planted, plant.caught_by)), output(result)
    text = "\n".join(failed.values())
    missing = [fragment for fragment in plant.says if fragment not in text]
    assert not missing, f"the failures do not say {missing}:\n{text}"
