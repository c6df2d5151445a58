"""Baseline documents for the baseline tests: one good recorded entry, and a writer of whole
files (valid or spoilt) as a hand edit or a bad merge leaves them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from conftest import LABEL
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec

SPEC = StepSpec(model="tiny-llama", batch=1, seq=32)
GOOD = MemoryResult(
    label=SPEC.label,
    meter="host",
    device="host-cpu",
    peak_bytes=300,
    step_peak_bytes=(300, 250, 250),
    breakdown=Breakdown(param_bytes=100, grad_bytes=100, activation_bytes=100),
    spec=SPEC,
    versions={"torch": "2.5.0", "pytest-vram": "0.1.0"},
).to_dict()
assert SPEC.label == LABEL


def entry(**changes: Any) -> dict[str, Any]:
    return copy.deepcopy(GOOD) | changes


def write_doc(path: Path, entries: Any, **doc: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"schema": 1, "device": "host-cpu", "entries": entries} | doc
    path.write_text(json.dumps(full, sort_keys=True, indent=2, ensure_ascii=False) + "\n")
    return path.read_bytes()
