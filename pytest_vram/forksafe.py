"""No CUDA before fork: find who probes CUDA, and refuse to measure in a poisoned fork.

A process forked after CUDA was initialised cannot use CUDA ("Cannot re-initialize CUDA in
forked subprocess"). The cuda meter's cases are forks of the worker server, and ZeRO ranks are
forks of the case's child, so neither parent may touch CUDA. Several libraries do at import
time: bitsandbytes calls ``torch.cuda.is_available()``, ``device_count()`` and
``get_device_capability()`` (the last initialises CUDA outright), DeepSpeed's accelerator probe
calls ``device_count()``. torch documents that ``is_available()`` and ``device_count()`` leave
fork usable only with ``PYTORCH_NVML_BASED_CUDA_CHECK=1``.

Three tools, all plain functions:

- ``probe_imports(modules)`` imports each module in a fresh interpreter with ``torch.cuda``'s
  probes wrapped, and returns who called which probe: the check that a preload list is safe,
  runnable on a CPU-only machine (a probe called there would also be called on a GPU).
- ``arm()`` wraps the probes in this process to remember their first callers; the cuda worker
  server arms itself before its preload (this module is its first import, with
  ``ARM_VARIABLE`` set), so a poisoned fork can say what poisoned it.
- ``check_fork(where)`` raises ``CudaForkError`` in a process forked after CUDA was initialised,
  naming the callers ``arm()`` saw; ``disarm()`` then takes the wrappers off in a process that
  forks no more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = [
    "ARM_VARIABLE",
    "NVML_CHECK",
    "PROBES",
    "CudaForkError",
    "arm",
    "check_fork",
    "disarm",
    "probe_imports",
    "seen",
]

# torch.cuda functions that initialise CUDA, or poison fork without NVML_CHECK.
PROBES: Final = (
    "is_available",
    "device_count",
    "get_device_capability",
    "_lazy_init",
    "current_device",
    "get_device_properties",
)
# With this set, is_available() and device_count() ask NVML and leave fork usable.
NVML_CHECK: Final = "PYTORCH_NVML_BASED_CUDA_CHECK"
# Set in the cuda worker server's environment: importing this module there arms it at once,
# before the rest of the preload (a forkserver preload can import modules, not call functions).
ARM_VARIABLE: Final = "PYTEST_VRAM_FORKSAFE_ARM"
_MAX_SEEN: Final = 20
_seen: list[str] = []  # "get_device_capability from bitsandbytes.cuda_specs (cuda_specs.py:24)"
_armed = False


class CudaForkError(RuntimeError):
    """This process was forked from one that had initialised CUDA; it cannot use the GPU."""


def _caller(depth: int) -> str:
    frame = sys._getframe(depth)
    # Skip torch's own frames (is_available calls device_count, _lazy_init is called by C++
    # through torch.cuda): the caller worth naming is the first one outside torch.
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("torch"):
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "?")
    return f"{module} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"


def _wrap(cuda: Any, name: str, record: Callable[[str], None]) -> None:
    original = getattr(cuda, name)
    if getattr(original, "_pytest_vram_probe", False):
        return

    def probe(*args: Any, **kwargs: Any) -> Any:
        record(f"torch.cuda.{name} from {_caller(2)}")
        return original(*args, **kwargs)

    probe._pytest_vram_probe = True  # type: ignore[attr-defined]
    probe.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(cuda, name, probe)


def _remember(call: str) -> None:
    if call not in _seen and len(_seen) < _MAX_SEEN:
        _seen.append(call)


def arm() -> None:
    """Remember the first callers of torch.cuda's probes in this process (and its forks)."""
    global _armed
    if _armed:
        return
    import torch.cuda

    for name in PROBES:
        _wrap(torch.cuda, name, _remember)
    _armed = True


def disarm() -> None:
    """Put torch.cuda's own probes back: a process that passed ``check_fork`` and forks no
    more measures its step without a wrapper on every ``current_device()`` call."""
    global _armed
    import torch.cuda

    for name in PROBES:
        probe = getattr(torch.cuda, name)
        if getattr(probe, "_pytest_vram_probe", False):
            setattr(torch.cuda, name, probe.__wrapped__)
    _armed = False


def seen() -> tuple[str, ...]:
    """The probe calls ``arm()`` has seen, first ones first (at most 20 distinct)."""
    return tuple(_seen)


def check_fork(where: str) -> None:
    """Raise ``CudaForkError`` if this process is a fork of one that initialised CUDA."""
    import torch.cuda

    if not torch.cuda._is_in_bad_fork():
        return
    calls = seen()
    found = (
        "; the CUDA calls made before the fork: " + "; ".join(calls)
        if calls
        else "; no probe call was recorded (pytest_vram.forksafe.arm() was not called first)"
    )
    raise CudaForkError(
        f"{where} was forked from a process that had initialised CUDA, so it cannot use the "
        f"GPU{found}. A module imported before the fork touched CUDA: import it inside the "
        "function that runs on the GPU instead of at module level or in --vram-import"
    )


_PROBE_SCRIPT: Final = """
import importlib, json, sys
from pytest_vram import forksafe
calls = []
import torch.cuda
for name in forksafe.PROBES:
    forksafe._wrap(torch.cuda, name, calls.append)
importlib.import_module(sys.argv[1])
print("\\n" + json.dumps(sorted(set(calls))))
"""


def probe_imports(modules: Sequence[str], *, timeout_s: float = 600) -> dict[str, tuple[str, ...]]:
    """Each module imported alone in a fresh interpreter, with ``torch.cuda``'s probes
    wrapped: module -> the probe calls its import made (empty when it is fork-safe).

    The interpreter has ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, as the cuda worker server does,
    and the hub offline. A module that fails to import is a RuntimeError with its output."""
    env = {**os.environ, NVML_CHECK: "1", "HF_HUB_OFFLINE": "1"}
    env.pop(ARM_VARIABLE, None)  # armed, this module would wrap the probes before the script
    found: dict[str, tuple[str, ...]] = {}
    for module in modules:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT, module],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"importing {module} failed (exit {proc.returncode}):\n{tail}")
        found[module] = tuple(json.loads(proc.stdout.strip().splitlines()[-1]))
    return found


if os.environ.get(ARM_VARIABLE) == "1":
    arm()
