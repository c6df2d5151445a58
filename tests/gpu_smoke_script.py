"""benchmarks/gpu_smoke.py loaded as a module, for the tests of test_gpu_smoke.py (its no-GPU exit
and pure parts) and test_gpu_smoke_steps.py (its generated project and step verdicts).

The script is loaded by path: benchmarks/ is not a package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def load() -> ModuleType:
    """The script as a module; sys.path is given back as it was (the script adds its folder)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


smoke = load()
cases = smoke.cases
