"""No CUDA before fork: what the cuda worker server and a ZeRO case's child import must not
touch CUDA. Checked on CPU: a probe called here would be called on a GPU too (bitsandbytes
calls is_available() first, and on a GPU goes on to initialise CUDA)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pytest_vram import StepSpec, forksafe
from pytest_vram.worker import RANK_PARENT_MODULES, Job, preload_modules


def test_the_cuda_servers_preload_calls_no_cuda_probe() -> None:
    modules = preload_modules("cuda")
    assert {"torch", "transformers", "pytest_vram.step", "pytest_vram.meters.cuda"} <= set(modules)
    found = forksafe.probe_imports(modules)
    assert found == {m: () for m in modules}


def test_what_a_case_child_imports_before_forking_ranks_calls_no_cuda_probe() -> None:
    found = forksafe.probe_imports(RANK_PARENT_MODULES)
    assert found == {m: () for m in RANK_PARENT_MODULES}


# A cuda case's child as the cuda server forks it, up to the point where it forks its ranks:
# run_ranks is replaced by a report of what that child had done by then.
_RANK_PARENT = """
import json, os, pickle, sys
from pytest_vram import forksafe
os.environ[forksafe.NVML_CHECK] = "1"  # the cuda server's environment, which its cases inherit
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DS_ACCELERATOR"] = "cpu"  # exported by the user: GPU ranks get CUDA's all the same
calls = []
import torch.cuda
for name in forksafe.PROBES:
    forksafe._wrap(torch.cuda, name, calls.append)
from pytest_vram import ranks, worker

class Forked(Exception):
    pass

def run_ranks(world, label, meter, body, imports=(), *, start_group):
    call = body.args[0]  # ZeRO: the spec; vram.measure: the pickled call, unpickled in a rank
    print(json.dumps({
        "label": label, "world": world, "start_group": start_group, "device": meter.device,
        "imports": list(imports), "probes": sorted(set(calls)),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
        "imported": sorted(m for m in ("user_registers", "user_fns") if m in sys.modules),
        "call": call.hex() if isinstance(call, bytes) else None,
    }))
    raise Forked

ranks.run_ranks = run_ranks
sys.path.insert(0, sys.argv[1])
with open(sys.argv[2], "rb") as f:
    jobs = pickle.load(f)
for job in jobs:
    try:
        worker._execute(job)
    except Forked:
        continue
    raise AssertionError(f"{job.label} forked no ranks")
"""


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("deepspeed", "bitsandbytes")),
    reason="ZeRO and QLoRA cases need pytest-vram[zero] and bitsandbytes",
)
def test_a_cuda_case_child_touches_no_cuda_before_forking_its_ranks(tmp_path: Path) -> None:
    """What worker._execute really does in a cuda case's child before the ranks fork: no CUDA
    probe, DeepSpeed's CUDA accelerator chosen, and the user's modules (--vram-import, the
    module of a vram.measure function) left for the ranks to import."""
    # A registering module as users write them; bitsandbytes calls is_available() at import.
    (tmp_path / "user_registers.py").write_text("import bitsandbytes\nimport deepspeed\n")
    (tmp_path / "user_fns.py").write_text("def train(steps):\n    return None\n")
    imports = ("user_registers",)
    zero = [
        StepSpec(model="tiny-llama", precision="bf16", batch=1, seq=32, ranks=2, **kw)
        for kw in (
            {"zero": 2},
            {"method": "qlora", "zero": 2},
            {"method": "lora", "zero": 3, "offload": "both"},
        )
    ]
    jobs = [Job("cuda", spec=spec, imports=imports) for spec in zero]
    sys.path.insert(0, str(tmp_path))
    try:  # the pytest process pickles the call, as it does for the worker
        fn = importlib.import_module("user_fns").train
        jobs.append(Job("cuda", fn=fn, args=(2,), ranks=2, imports=imports))
        (tmp_path / "jobs.pickle").write_bytes(pickle.dumps(jobs))
        call = jobs[-1].call
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_fns", None)
    argv = [sys.executable, "-c", _RANK_PARENT, str(tmp_path), str(tmp_path / "jobs.pickle")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    forks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [f["label"] for f in forks] == [job.label for job in jobs]
    for fork, job in zip(forks, jobs, strict=True):
        assert fork["probes"] == [], fork["label"]
        assert fork["DS_ACCELERATOR"] == "cuda" and fork["device"] == "cuda:0"
        assert fork["imported"] == [] and fork["imports"] == list(imports)
        assert fork["world"] == 2 and fork["start_group"] == (job.spec is not None)
    assert call is not None and forks[-1]["call"] == call.hex()  # handed to the ranks whole


def test_the_probe_names_the_library_that_touches_cuda_at_import() -> None:
    # The host server's preload: peft imports bitsandbytes, which probes CUDA at import. This
    # is what made every forked GPU case fail; the check must see it.
    found = forksafe.probe_imports(["peft", "deepspeed"])
    assert any(c.startswith("torch.cuda.is_available from bitsandbytes") for c in found["peft"])
    assert any("from deepspeed.accelerator" in c for c in found["deepspeed"]), found
    assert "peft" in preload_modules("host") and "peft" not in preload_modules("cuda")


def test_a_module_that_fails_to_import_is_an_error_naming_it() -> None:
    with pytest.raises(RuntimeError, match="importing no_such_module_here failed"):
        forksafe.probe_imports(["no_such_module_here"])


def test_preload_modules_of_an_unknown_meter() -> None:
    with pytest.raises(ValueError, match="unknown meter 'tpu'"):
        preload_modules("tpu")


_ARMED = """
import os, sys, types
os.environ[{var!r}] = "1"
from pytest_vram import forksafe  # arms itself, as in the cuda server
import torch.cuda

culprit = types.ModuleType("culprit_lib")
exec("import torch\\ndef probe():\\n    return torch.cuda.get_device_capability(0)", culprit.__dict__)
try:
    culprit.probe()  # on a CPU build this raises once it gets past the wrapper
except Exception:
    pass
for _ in range(3):
    torch.cuda.is_available()  # remembered once
print(repr(forksafe.seen()))
armed = forksafe.seen()
forksafe.disarm()
assert not hasattr(torch.cuda.is_available, "_pytest_vram_probe")
torch.cuda.device_count()  # not remembered once disarmed
assert forksafe.seen() == armed, forksafe.seen()
torch.cuda._is_in_bad_fork = lambda: True
try:
    forksafe.check_fork("rank 1 of 2")
except forksafe.CudaForkError as exc:
    print(exc)
"""


def test_an_armed_process_names_who_touched_cuda_when_its_fork_is_poisoned() -> None:
    script = textwrap.dedent(_ARMED.format(var=forksafe.ARM_VARIABLE))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen, message = proc.stdout.strip().splitlines()[-2:]
    calls = eval(seen)
    assert calls[0] == "torch.cuda.get_device_capability from culprit_lib (<string>:3)"
    assert sum(c.startswith("torch.cuda.is_available from __main__") for c in calls) == 1
    assert message.startswith(
        "rank 1 of 2 was forked from a process that had initialised CUDA, so it cannot use the GPU"
    )
    assert "get_device_capability from culprit_lib" in message
    assert "import it inside the function" in message


def test_check_fork_passes_in_a_clean_process() -> None:
    assert not torch.cuda._is_in_bad_fork()
    forksafe.check_fork("this process")  # no error


def test_check_fork_without_arming_says_nothing_was_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    monkeypatch.setattr(forksafe, "_seen", [])
    with pytest.raises(forksafe.CudaForkError, match="no probe call was recorded"):
        forksafe.check_fork("this case's child process")


def test_host_cases_measure_the_same_in_the_cuda_server(vram_project, pytester) -> None:
    """A test marked device="cuda" makes the session's server the cuda one (no peft in its
    preload); a host case in that session imports peft in its own child, before its meter, and
    must measure what it measures in the host server, to the byte."""
    lora = """
        import os, sys
        import pytest

        def server_flavour():
            from pytest_vram import forksafe
            assert os.environ.get(forksafe.NVML_CHECK) == "1", "not the cuda server's child"
            assert "peft" in sys.modules

        @pytest.mark.vram_budget(gb=1, model="tiny-llama", method="lora", batch=1, seq=32)
        def test_lora(vram):
            vram.step()
    """
    vram_project.write(lora)
    vram_project.record("--vram-tolerance", "0")
    vram_project.write(
        lora
        + """
        @pytest.mark.vram_budget(gb=1, device="cuda", model="tiny-llama", batch=1, seq=32)
        def test_on_the_gpu(vram):
            vram.step()

        @pytest.mark.vram_budget(gb=1)
        def test_flavour(vram):
            vram.measure(server_flavour)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--vram-tolerance", "0", "--vram-strict", "-rA"
    )
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text
    outcomes = result.parseoutcomes()
    # test_on_the_gpu fails: no GPU here (in the cuda server's child, not as a bad fork);
    # test_flavour fails only for want of a baseline, after its checks ran in the child.
    assert outcomes.get("passed") == 1 and outcomes.get("failed") == 2, text
    assert "PASSED test_mem.py::test_lora" in text
    assert "needs a visible GPU" in text
    assert "no baseline for [test_mem.server_flavour]" in text
