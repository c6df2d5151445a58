"""GPU smoke check: does pytest-vram's ``--gpu`` path work on this machine? About 10 minutes.

    python benchmarks/gpu_smoke.py [--out DIR] [--quick]

Runs the steps of ``STEPS`` in priority order (``--quick``: the first three), each a row of the
pass/fail/skip table it ends with. Every subprocess's output, the generated test project and the
JSON and JUnit reports go to one folder, by default ``gpu-smoke-<UTC timestamp>/`` in the
current directory. Exit status 0 when every step that ran passed, 1 otherwise, and 2 at once
when no GPU is visible (decided before torch is imported anywhere). docs/gpu.md ("Before the
first GPU run") says what each step checks and what its failure means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

HERE: Final = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (the tests): the templates module sits beside it
    sys.path.insert(0, str(HERE))
import gpu_smoke_cases as cases  # noqa: E402
from gpu_smoke_cases import install_hint, one_line  # noqa: E402

REPO: Final = HERE.parent
Status = Literal["pass", "fail", "skip"]
Outcome = tuple[Status, str]
NO_GPU: Final = "no GPU visible: {reason}; gpu_smoke checks the --gpu path and needs an NVIDIA GPU"


@dataclasses.dataclass
class Context:
    out: Path
    repo: Path
    env: dict[str, str]  # every subprocess's environment (HF_HUB_OFFLINE=1)
    gpus: tuple[cases.Gpu, ...]  # as nvidia-smi -L lists them
    runs: int = 0  # subprocesses so far: numbers the log files in the order they ran

    @property
    def project(self) -> Path:
        return self.out / "project"


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Outcome]
    quick: bool = False  # part of --quick
    needs: str | None = None  # a module of cases.INSTALL it cannot run without


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    title: str
    status: str
    detail: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Ran:
    """One subprocess; for a pytest run also what its JSON and JUnit reports hold."""

    returncode: int | None  # None: killed at its timeout, or could not start
    output: str  # stdout then stderr
    log: str  # the stem of its .stdout/.stderr files in the log folder
    cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # --vram-json's
    failures: list[str] = dataclasses.field(default_factory=list)  # JUnit failure/error texts

    @property
    def why(self) -> str:
        """The first failure's first line, else the output's last line, for a detail."""
        if self.failures:
            return one_line(cases.first_line(self.failures[0]))
        lines = self.output.strip().splitlines()
        return one_line(lines[-1] if lines else "no output") + f" (see {self.log}.*)"


# -- pure helpers -------------------------------------------------------------------------------


def exit_code(statuses: Iterable[str]) -> int:
    """0 when every step that ran passed (skips are not failures), else 1."""
    return 0 if all(s in ("pass", "skip") for s in statuses) else 1


def table(rows: Sequence[Row]) -> str:
    """The final table, one row per step, and a count line."""
    header = ("step", "check", "status", "seconds", "detail")
    body = [(r.key, r.title, r.status.upper(), f"{r.seconds:.1f}", r.detail) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]

    def fmt(cells: Sequence[str]) -> str:
        key, title, status, seconds, detail = cells
        w = widths
        return f"{key:<{w[0]}}  {title:<{w[1]}}  {status:<{w[2]}}  {seconds:>{w[3]}}  {detail}".rstrip()

    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skip")}
    total = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
    return "\n".join([fmt(header), *map(fmt, body), total])


# -- subprocesses -------------------------------------------------------------------------------


def run(
    ctx: Context,
    name: str,
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> Ran:
    """Run one command, its output kept as ``NN-name.stdout/.stderr`` in the log folder."""
    ctx.runs += 1
    stem = f"{ctx.runs:02d}-{name}"
    start = time.perf_counter()
    code: int | None = None
    try:
        # Own session: a timeout kills the pytest run's worker server and case children too.
        pipe, full_env = subprocess.PIPE, {**ctx.env, **(env or {})}
        with subprocess.Popen(
            argv,
            cwd=cwd or ctx.project,
            env=full_env,
            stdout=pipe,
            stderr=pipe,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(timeout=timeout_s)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                err += f"\n[gpu_smoke: killed after {timeout_s:.0f} s]\n"
    except OSError as exc:
        out, err = "", f"[gpu_smoke: could not start: {exc}]\n"
    (ctx.out / f"{stem}.stdout").write_text(out, encoding="utf-8")
    (ctx.out / f"{stem}.stderr").write_text(err, encoding="utf-8")
    with (ctx.out / "commands.log").open("a", encoding="utf-8") as log:
        seconds = time.perf_counter() - start
        log.write(f"{stem}: exit {code} after {seconds:.1f} s in {cwd or ctx.project}\n")
        log.write(f"  {' '.join(f'{k}={v}' for k, v in (env or {}).items())} {shlex.join(argv)}\n")
    return Ran(code, out + err, stem)


def pytest_case(
    ctx: Context, name: str, nodes: Sequence[str], *args: str, refresh: bool = False, **kw: Any
) -> Ran:
    """``pytest --gpu`` (or ``pytest-vram refresh --gpu``) on cases of the generated project."""
    json_path, xml_path = ctx.out / "reports" / f"{name}.json", ctx.out / "reports" / f"{name}.xml"
    head = ["-m", "pytest_vram.cli", "refresh"] if refresh else ["-m", "pytest"]
    reports = ["--vram-json", str(json_path), f"--junitxml={xml_path}"]
    argv = [sys.executable, *head, "--gpu", "-p", "no:cacheprovider", *nodes, *args, *reports]
    # On PYTHONPATH, so the worker's children can import what vram.measure sends them.
    path = os.pathsep.join(filter(None, [str(ctx.project), ctx.env.get("PYTHONPATH")]))
    ran = run(ctx, name, argv, env={"PYTHONPATH": path, **kw.pop("env", {})}, **kw)
    return dataclasses.replace(
        ran, cases=cases.json_cases(json_path), failures=cases.junit_failures(xml_path)
    )


def passed_on_cuda(r: Ran, what: str) -> Outcome:
    """Exit 0 and every case of the JSON report measured by the cuda meter."""
    if r.returncode != 0:
        return "fail", f"{what}: exit {r.returncode}: {r.why}"
    meters = {(c.get("result") or {}).get("meter") for c in r.cases}
    if meters != {"cuda"}:
        return "fail", f"{what}: passed but the JSON report's meters are {sorted(map(str, meters))}"
    return "pass", "; ".join(map(cases.describe, r.cases))


# -- the steps ----------------------------------------------------------------------------------


def step_environment(ctx: Context) -> Outcome:
    smi = run(ctx, "environment-nvidia-smi", ["nvidia-smi", "-L"])
    for gpu in cases.parse_gpus(smi.output):
        print(f"    GPU {gpu.index}: {gpu.name} {gpu.uuid}")
    probe = run(ctx, "environment-torch", [sys.executable, "-c", cases.ENVIRONMENT])
    info = cases.last_json(probe.output)
    if info is None:
        return "fail", f"the torch/NVML probe failed (exit {probe.returncode}; see {probe.log}.*)"
    problems = [] if smi.returncode == 0 else [f"nvidia-smi -L failed: {smi.why}"]
    if not info["available"]:
        problems.append("torch.cuda.is_available() is False")
    if info["nvml"]:
        problems.append(f"NVML: {info['nvml']}")
    names = ", ".join(info["names"]) or "none"
    versions = f"torch {info['torch']}, CUDA {info['cuda']}, GPUs seen by torch: {names}"
    return ("fail", "; ".join(problems) + f" ({versions})") if problems else ("pass", versions)


def step_fork_safety(ctx: Context) -> Outcome:
    proc = run(ctx, "fork-safety", [sys.executable, "-c", cases.FORK_SAFETY], timeout_s=900)
    data = cases.last_json(proc.output)
    if data is None:
        return "fail", f"the probe did not report (exit {proc.returncode}; see {proc.log}.*)"
    if "error" in data:
        return "fail", data["error"]
    bad = {module: calls for module, calls in data["found"].items() if calls}
    if bad:
        return "fail", "; ".join(f"importing {m} calls {', '.join(c)}" for m, c in bad.items())
    modules = ", ".join(data["modules"])
    return "pass", f"{len(data['modules'])} modules import without a CUDA call: {modules}"


def step_one_case(ctx: Context) -> Outcome:
    base = ["--vram-update", "--vram-baselines", str(ctx.out / "baselines")]
    return passed_on_cuda(pytest_case(ctx, "one-case", [cases.ONE], *base), "the case")


def step_unit_tests(ctx: Context) -> Outcome:
    if not (ctx.repo / "tests").is_dir():
        return "skip", "no tests/ beside benchmarks/: not a clone of the repository"
    xml = ctx.out / "reports" / "gpu-unit.xml"
    argv = [sys.executable, "-m", "pytest", "--gpu", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    ran = run(ctx, "gpu-unit", [*argv, f"--junitxml={xml}"], cwd=ctx.repo, timeout_s=900)
    counts = ", ".join(f"{n} {k}" for k, n in cases.junit_counts(xml).items())
    if ran.returncode != 0:
        ran = dataclasses.replace(ran, failures=cases.junit_failures(xml))
        return "fail", f"exit {ran.returncode} ({counts or 'no JUnit report'}): {ran.why}"
    return "pass", counts


def recheck(*nodes: str) -> Callable[[Context], Outcome]:
    """Record baselines with ``pytest-vram refresh --gpu``, then re-check them with ``pytest --gpu``."""
    name = nodes[0].split("::")[-1]

    def step(ctx: Context) -> Outcome:
        base = ["--vram-baselines", str(ctx.out / "baselines")]
        outcome = passed_on_cuda(
            pytest_case(ctx, f"{name}-record", nodes, *base, refresh=True), "recording"
        )
        if outcome[0] != "pass":
            return outcome
        checked = pytest_case(ctx, f"{name}-recheck", nodes, *base)
        outcome = passed_on_cuda(checked, "the re-check against the recorded baselines")
        if outcome[0] != "pass":
            return outcome
        return "pass", "re-checked: " + "; ".join(
            f"[{c['label']}] {cases.gib(c['peak_bytes'])} vs {cases.gib(c['baseline_bytes'])}"
            for c in checked.cases
        )

    return step


def step_oom(ctx: Context) -> Outcome:
    r = pytest_case(ctx, "oom", [cases.OOM], "--vram-baselines", str(ctx.out / "baselines"))
    if "INTERNALERROR" in r.output:
        return "fail", f"INTERNALERROR: the plugin crashed, see {r.log}.*"
    if r.returncode != 1:
        return "fail", f"expected the test to fail (exit 1), got exit {r.returncode}: {r.why}"
    # The failure's first line is the case's reason: "out of memory: OutOfMemoryError: ..."
    oom = [f for f in r.failures if "out of memory" in cases.first_line(f).lower()]
    if not oom:
        return "fail", f"the test failed, but not with 'out of memory': {r.why}"
    return "pass", "failed as expected: " + one_line(cases.first_line(oom[0]), 160)


def step_nvml(ctx: Context) -> Outcome:
    base = ["--vram-update", "--vram-baselines", str(ctx.out / "baselines-nvml")]
    r = pytest_case(ctx, "nvml", [cases.ONE], "--vram-peak-source", "nvml", *base)
    status, detail = passed_on_cuda(r, "the case")
    sources = {(c.get("result") or {}).get("peak_source") for c in r.cases}
    if status == "pass" and sources != {"nvml"}:
        return "fail", f"passed but its peak_source is {sorted(map(str, sources))}, not nvml"
    missing, compared = cases.nvml_prediction(r.cases)
    if status == "pass" and missing:
        return "fail", f"passed but {missing}"
    notes = [n for c in r.cases for n in c.get("notes", [])]
    extra = f"; {compared}" if compared else ""
    return status, detail + extra + (f"; note: {one_line(notes[0], 120)}" if notes else "")


def step_snapshot(ctx: Context) -> Outcome:
    base = ["--vram-baselines", str(ctx.out / "baselines-over")]
    r = pytest_case(ctx, "over-budget", [cases.OVER_BUDGET], *base)
    if "INTERNALERROR" in r.output or r.returncode != 1:
        return "fail", f"expected the test to fail (exit 1), got exit {r.returncode}: {r.why}"
    text = "\n".join(r.failures) or r.output
    found = cases.SNAPSHOT.search(text)
    if "exceeds budget" not in text or found is None:
        return "fail", f"the failure names no memory snapshot: {r.why}"
    path = Path(found[1]) if Path(found[1]).is_absolute() else ctx.project / found[1]
    if not path.is_file():
        return "fail", f"the failure names the snapshot {path}, which does not exist"
    return "pass", f"over budget, kept {path.name} ({path.stat().st_size:,} bytes)"


def step_uuid(ctx: Context) -> Outcome:
    if not ctx.gpus:
        return "fail", "nvidia-smi -L listed no GPU UUID"
    uuid = ctx.gpus[0].uuid
    base = ["--vram-update", "--vram-baselines", str(ctx.out / "baselines-uuid")]
    env = {"CUDA_VISIBLE_DEVICES": uuid}
    r = pytest_case(ctx, "uuid", [cases.ONE], *base, env=env)
    status, detail = passed_on_cuda(r, f"CUDA_VISIBLE_DEVICES={uuid}")
    return status, detail if status != "pass" else f"CUDA_VISIBLE_DEVICES={uuid}: {detail}"


def step_xdist(ctx: Context) -> Outcome:
    if not ctx.gpus:
        return "fail", "nvidia-smi -L listed no GPU UUID"
    env = {"CUDA_VISIBLE_DEVICES": ctx.gpus[0].uuid}
    base = ["-n", "2", "--vram-baselines", str(ctx.out / "baselines-xdist")]
    r = pytest_case(ctx, "xdist", [cases.ONE], *base, env=env)
    said = [line for line in r.output.splitlines() if "xdist workers" in line]
    problems = [f"exit {r.returncode}, not 4"] if r.returncode != 4 else []
    problems += [] if said else ["no message naming 'xdist workers'"]
    problems += ["INTERNALERROR in the output"] if "INTERNALERROR" in r.output else []
    if problems:
        return "fail", "; ".join(problems) + f" (see {r.log}.*)"
    return "pass", "exit 4: " + one_line(said[0], 180)


STEPS: Final = (
    Step("1", "environment and NVML", step_environment, quick=True),
    Step("2", "fork-safe preload", step_fork_safety, quick=True),
    Step("3", "one case through the worker", step_one_case, quick=True),
    Step("4", "GPU unit tests", step_unit_tests),
    Step("5a", "record/re-check full adamw bf16", recheck(cases.PLAIN)),
    Step("5b", "record/re-check 4-step leak check", recheck(cases.LEAK)),
    Step("5c", "record/re-check qlora", recheck(cases.QLORA), needs="bitsandbytes"),
    Step("5d", "record/re-check ZeRO ranks=1", recheck(*cases.ZERO), needs="deepspeed"),
    Step("5e", "out of memory in vram.measure", step_oom),
    Step("6", "nvml peak source", step_nvml),
    Step("7", "over budget keeps a snapshot", step_snapshot),
    Step("8", "GPU picked by UUID", step_uuid),
    Step("9", "-n 2 on one GPU: usage error", step_xdist, needs="xdist"),
)


# -- the run ------------------------------------------------------------------------------------


def run_step(ctx: Context, step: Step) -> Row:
    print(f"[{step.key}] {step.title} ...", flush=True)
    start = time.perf_counter()
    try:
        if step.needs and importlib.util.find_spec(step.needs) is None:
            hint = install_hint(step.needs)
            status, detail = "skip", f"{step.needs} is not installed: {hint}"
        else:
            status, detail = step.run(ctx)
    except Exception as exc:  # a bug of this script's step: the table still gets its row
        status, detail = "fail", f"gpu_smoke error: {type(exc).__name__}: {exc}"
    row = Row(step.key, step.title, status, one_line(detail), time.perf_counter() - start)
    print(f"[{step.key}] {status.upper()} in {row.seconds:.1f} s: {row.detail}", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="log folder (default: gpu-smoke-<UTC time>/)")
    parser.add_argument("--quick", action="store_true", help="steps 1-3 only")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reason, gpus = cases.no_gpu_reason(env)
    if reason is not None:
        print(NO_GPU.format(reason=reason), file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or Path(f"gpu-smoke-{stamp}")).resolve()
    ctx = Context(out, REPO, env, gpus)
    for name, text in cases.project_files().items():
        (ctx.project / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.project / name).write_text(text, encoding="utf-8")
    (out / "reports").mkdir(exist_ok=True)
    print(f"gpu_smoke: logs in {out}", flush=True)
    rows = [run_step(ctx, step) for step in STEPS if step.quick or not args.quick]
    text = table(rows)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    (out / "steps.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(f"\n{text}\nlogs: {out}")
    return exit_code(r.status for r in rows)


if __name__ == "__main__":
    sys.exit(main())
