"""What each CI workflow (.github/workflows) and tox env must do: runner labels, caches, reports,
triggers, permissions and the commands in order. The schema and structure checks of every
workflow are test_workflows.py.
"""

from __future__ import annotations

import configparser

import pytest
import yaml
from workflow_docs import (
    DOCS,
    GPU_LABELS,
    GPU_WORKFLOWS,
    ROOT,
    WORKFLOWS,
    step,
    steps,
    triggers,
    uses,
    workflow,
    workflow_files,
)

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


def test_ci_script_prebuilds_before_the_tests_and_checks_the_wheel_beside_them() -> None:
    """DeepSpeed's ops are built beside the linters and the wheel checked beside the project's
    tests; the script waits for each where its result is needed, and fails with it."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()]
    build_line = next(i for i, line in enumerate(lines) if line.startswith("pytest-vram build-ops"))
    built = lines.index('wait "$build_pid" || build_status=$?')
    assert build_line < built < lines.index("pytest suites -n auto")
    assert 'exit "$build_status"' in lines[built : lines.index("pytest suites -n auto")]
    check_line = next(i for i, line in enumerate(lines) if line.startswith("bash .ci/wheel-check"))
    assert lines[check_line].endswith("&")
    assert lines.index("pytest suites -n auto") < check_line
    assert check_line < lines.index("python -m pytest -n auto")
    waited = lines.index('wait "$wheel_pid" || wheel_status=$?')
    assert lines.index("python -m pytest -n auto") < waited
    assert 'exit "$wheel_status"' in lines[waited:]
    check = (ROOT / ".ci" / "wheel-check").read_text("utf-8")
    # The wheel, not the checkout: installed into its own venv, run from outside the tree.
    assert "python -m build" in check and '"$wheel"' in check and 'cd "$work/project"' in check


def test_cpu_adam_is_built_by_build_ops_for_trainers_only() -> None:
    """The built-in step's offload steps the client torch optimizer
    ("zero_force_ds_cpu_optimizer": false); DeepSpeedCPUAdam is what accelerate swaps in for a
    Trainer under optimizer offload, built by build-ops, never by a workflow of its own."""
    from pytest_vram import StepSpec
    from pytest_vram.zero.config import ds_config

    spec = StepSpec(model="tiny-llama", zero=2, offload="optimizer", ranks=2)
    assert ds_config(spec, 2**16)["zero_force_ds_cpu_optimizer"] is False
    assert not [p.name for p in workflow_files() if "CPUAdam" in p.read_text("utf-8")]
    docs = DOCS.read_text("utf-8")
    assert all("build-ops" in line for line in docs.splitlines() if "CPUAdam" in line)
    assert "pytest-vram build-ops" in docs and "being wired" not in docs


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


def test_tox_gpu_smoke_runs_the_smoke_script_as_the_gpu_env_installs() -> None:
    smoke = tox()["testenv:gpu-smoke"]
    assert smoke["commands"].strip() == "python benchmarks/gpu_smoke.py {posargs}"
    assert (ROOT / "benchmarks" / "gpu_smoke.py").is_file()
    # The same extras and variables as the gpu env: the script runs the GPU suites' stack.
    assert smoke["extras"] == "{[testenv:gpu]extras}"
    assert smoke["passenv"] == "{[testenv:gpu]passenv}"
    assert "tox -e gpu-smoke" in DOCS.read_text("utf-8")
