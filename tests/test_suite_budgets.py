"""The shipped suites' budgets are sized for the GPU (README, "The shipped suite on a GPU"):
every case's recorded host peak plus what a GPU's reserved peak adds, as the README states it,
must stay within the budget of its test's marker. No GPU needed: the host peaks are the
baselines in baselines/host-cpu/suites, the budgets are read from the suite modules' source.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_vram.marker import MarkerArgs, parse_marker

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "baselines" / "host-cpu" / "suites"
MIB = 2**20


def readme_claims() -> dict[str, int]:
    """The numbers the README's paragraph on the shipped suite on a GPU states, in MiB."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("**The shipped suite on a GPU.**")
    paragraph = " ".join(text[start : text.index("\n\n", start)].split())
    found = {
        "host_peak_below": r"no host peak in it reaches (\d+) MiB",
        "workspace_per_handle": r"\((\d+) MiB per handle",
        "small_segment": r"rounding to (\d+) MiB and \d+ MiB segments",
        "large_segment": r"rounding to \d+ MiB and (\d+) MiB segments",
    }
    claims = {}
    for name, pattern in found.items():
        match = re.search(pattern, paragraph)
        assert match is not None, f"the README no longer says {pattern!r}: update this test"
        claims[name] = int(match[1])
    return claims


def gpu_extras(case: dict[str, Any], claims: dict[str, int]) -> int:
    """What a GPU's reserved peak adds to the host meter's, by the README's account."""
    # A cuBLAS workspace per handle and stream, taken from the caching allocator: one handle
    # for the forward's thread, one for autograd's backward thread, each with cuBLASLt's too
    # when it does not share cuBLAS's (as tests/test_cuda_meter.py bounds it).
    workspaces = 2 * 2 * claims["workspace_per_handle"] * MIB
    # The caching allocator's rounding: a partly used segment of each size. (AdamW's foreach
    # temporaries are in the host peak: every meter runs the implementation CUDA picks.)
    rounding = (claims["small_segment"] + claims["large_segment"]) * MIB
    return workspaces + rounding


def _is_budget(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return isinstance(func, ast.Attribute) and func.attr == "vram_budget"


def _marker(node: ast.expr) -> MarkerArgs:
    assert isinstance(node, ast.Call)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    return parse_marker((), kwargs)


def budgets(module: Path) -> dict[str, MarkerArgs]:
    """Each test function's vram_budget marker: its own decorator, else the module's
    ``pytestmark`` (the closest marker, as the plugin reads it)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    module_mark = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            marks = node.value.elts if isinstance(node.value, ast.List) else [node.value]
            module_mark = next((_marker(m) for m in marks if _is_budget(m)), None)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            own = [_marker(d) for d in node.decorator_list if _is_budget(d)]
            mark = own[0] if own else module_mark
            assert mark is not None, f"{module.name}::{node.name} has no vram_budget marker"
            found[node.name] = mark
    return found


BASELINE_FILES = sorted(BASELINES.glob("*.json"))


def test_every_suite_measured_on_the_gpu_has_host_baselines_to_check() -> None:
    on_gpu = [
        module.stem
        for module in sorted((ROOT / "suites").glob("test_*.py"))
        if any(m.device in (None, "cuda") for m in budgets(module).values())
    ]
    assert on_gpu and [p.stem for p in BASELINE_FILES] == on_gpu


@pytest.mark.parametrize("baseline", BASELINE_FILES, ids=[p.stem for p in BASELINE_FILES])
def test_host_peak_plus_what_a_gpu_adds_fits_the_budget(baseline: Path) -> None:
    claims = readme_claims()
    marks = budgets(ROOT / "suites" / f"{baseline.stem}.py")
    entries = json.loads(baseline.read_text(encoding="utf-8"))["entries"]
    checked = 0
    for test, cases in entries.items():
        mark = marks[test.split("[")[0]]
        if mark.device not in (None, "cuda"):
            continue  # such a test measures on its own meter under --gpu too
        for label, case in cases.items():
            peak, extras = case["peak_bytes"], gpu_extras(case, claims)
            assert peak < claims["host_peak_below"] * MIB, (
                f"README: no host peak reaches it; {label}"
            )
            assert peak + extras <= mark.budget_bytes, (
                f"{test} [{label}]: host peak {peak / MIB:.1f} MiB + GPU extras "
                f"{extras / MIB:.1f} MiB exceeds the budget {mark.budget_bytes / MIB:.0f} MiB"
            )
            checked += 1
    assert checked > 0


def test_the_budget_reader_takes_the_closest_marker(tmp_path: Path) -> None:
    module = tmp_path / "test_suite.py"
    module.write_text(
        "import pytest\n"
        "pytestmark = [pytest.mark.slow, pytest.mark.vram_budget(gb=0.25, model='tiny-llama')]\n"
        "@pytest.mark.vram_budget(gb=1, device='fake')\n"
        "def test_own(vram): ...\n"
        "def test_module(vram): ...\n"
    )
    marks = budgets(module)
    assert (marks["test_own"].budget_bytes, marks["test_own"].device) == (2**30, "fake")
    assert (marks["test_module"].budget_bytes, marks["test_module"].device) == (2**28, None)
