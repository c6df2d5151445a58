"""Confinement of what a case may fetch or run: the hub is offline in the cases unless the user
says otherwise, and a config.json that asks for remote code never gets it run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_SHAPE

HUB = """
    import os
    import pytest

    def hub_offline(expected):
        import huggingface_hub.constants as hub
        assert hub.HF_HUB_OFFLINE is expected, (os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE)

    @pytest.mark.vram_budget(gb=1)
    def test_hub(vram):
        vram.measure(hub_offline, {expected})
"""


@pytest.mark.parametrize(("exported", "expected"), [(None, True), ("0", False), ("1", True)])
def test_cases_run_with_the_hub_offline_unless_the_user_says_otherwise(
    vram_project, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, exported, expected
) -> None:
    # A subprocess: this process's worker server was started with this process's environment.
    if exported is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", exported)
    vram_project.write(HUB.format(expected=expected))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--vram-update")
    assert result.ret == 0, "\n".join(result.outlines + result.errlines)


def test_a_config_asking_for_remote_code_never_runs_it(tmp_path: Path) -> None:
    """A model_type transformers knows: the stock class would build, so only the auto_map
    check can refuse it (an unknown model_type is refused for that alone)."""
    ran = tmp_path / "remote-code-ran"
    (tmp_path / "modeling_evil.py").write_text(
        f"open({str(ran)!r}, 'w').write('imported')\n", encoding="utf-8"
    )
    config = {
        **TINY_SHAPE,
        "model_type": "llama",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_vram.cli", "estimate", str(path), "--seq", "8"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not ran.exists(), "the config's remote code was imported"
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        f"pytest-vram estimate: model {str(path)!r}: its config.json asks for remote code "
        "(auto_map: AutoConfig, AutoModelForCausalLM), which pytest-vram never runs: remove "
        "auto_map to measure the stock 'llama' architecture of transformers"
    ), line
