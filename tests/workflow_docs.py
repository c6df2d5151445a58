"""The CI workflows (.github/workflows) read as data, for test_workflows.py (schema and structure)
and test_workflow_jobs.py (what each workflow must do)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
DOCS = ROOT / "docs" / "gpu.md"
GPU_LABELS = ["self-hosted", "linux", "gpu"]  # documented in both GPU workflows and docs/gpu.md
GPU_WORKFLOWS = ("gpu.yml", "refresh-baselines.yml")


def load(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), f"a workflow is a mapping, got {type(doc).__name__}"
    if True in doc:  # YAML 1.1 reads the bare key `on` as the boolean True
        doc["on"] = doc.pop(True)
    return doc


def workflow(name: str) -> dict[str, Any]:
    return load((WORKFLOWS / name).read_text("utf-8"))


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.y*ml"))


def steps(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for job in doc.get("jobs", {}).values():
        yield from job.get("steps", [])


def step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in steps(doc) if s.get("name") == name]
    assert len(found) == 1, f"expected one step named {name!r}, found {len(found)}"
    return found[0]


def uses(doc: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in steps(doc) if str(s.get("uses", "")).split("@")[0] == action]


def triggers(doc: dict[str, Any]) -> set[str]:
    on = doc["on"]
    return {on} if isinstance(on, str) else set(on)
