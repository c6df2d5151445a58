"""``pytest-vram estimate`` on what it cannot run as asked: a model without the chosen attention
runs eager and says so, bad configs and arguments exit 2 in one line (in this process and as a
fresh one), and the libraries' import chatter stays off stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_SHAPE, estimate_json
from pytest_vram.cli import main


def estimate_process(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pytest-vram estimate ARGS`` in a fresh process."""
    command = [sys.executable, "-m", "pytest_vram.cli", "estimate", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)


def small_config(path: Path, kind: str = "LlamaConfig", **fields: Any) -> Path:
    """A 2-layer config.json of transformers' ``kind`` config class."""
    import transformers

    shape: dict[str, Any] = {**TINY_SHAPE, "head_dim": 16}
    getattr(transformers, kind)(**{**shape, **fields}).to_json_file(path)
    return path


def test_a_model_without_sdpa_runs_eager_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Gemma2 has no sdpa attention in transformers: unasked, the estimate uses eager (as
    transformers itself falls back) and says so; --attention eager runs without a note (the
    meta-device parameter count used to build with sdpa regardless); --attention sdpa is
    refused in one line naming the attention to use."""
    import transformers

    path = small_config(tmp_path / "config.json", "Gemma2Config", query_pre_attn_scalar=16)
    why = f"Gemma2ForCausalLM has no sdpa attention in transformers {transformers.__version__}"

    data = estimate_json(capsys, str(path), "--seq", "16")
    assert data["result"]["spec"]["attention"] == "eager"
    assert data["result"]["notes"][0] == f"attention eager, not the default sdpa: {why}"
    assert main(["estimate", str(path), "--seq", "16"]) == 0
    captured = capsys.readouterr()
    assert f"  note: attention eager, not the default sdpa: {why}\n" in captured.out
    assert captured.err == ""

    eager = estimate_json(capsys, str(path), "--seq", "16", "--attention", "eager")
    assert eager["result"]["peak_bytes"] == data["result"]["peak_bytes"]
    assert not any("attention" in note for note in eager["result"]["notes"])

    assert main(["estimate", str(path), "--attention", "sdpa"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        f"pytest-vram estimate: model {str(path)!r}: {why}; use attention='eager'\n",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # Fails the config class's own validation (huggingface_hub's StrictDataclassError).
        (
            {"num_attention_heads": 5},
            ": Class validation error for validator 'validate_architecture': ValueError: The "
            "hidden size (64) is not a multiple of the number of attention heads (5).",
        ),
        # Builds an embedding whose padding_idx fails an assert.
        (
            {"pad_token_id": 600},
            ": pad_token_id=600 is outside the vocabulary (vocab_size=512); set it below "
            "vocab_size or to null",
        ),
        # Passes the config, fails in the forward.
        (
            {"num_key_value_heads": 3},
            ": transformers raised RuntimeError: The size of tensor a (4) must match the "
            "size of tensor b (3) at non-singleton dimension 1",
        ),
    ],
)
def test_a_config_transformers_cannot_run_exits_2_in_one_line(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    """In a process of its own, as a user runs it (transformers binds its log handler to the
    stderr of the moment, which capsys closes). transformers' own warnings about the config
    may come first, as lines of their own; never a traceback."""
    path = tmp_path / "config.json"
    small_config(path, **{k: v for k, v in fields.items() if k != "num_attention_heads"})
    if "num_attention_heads" in fields:  # the config class itself refuses to write it
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    run = estimate_process(tmp_path, str(path), "--seq", "8")
    lines = [line for line in run.stderr.splitlines() if not line.startswith("[transformers]")]
    assert (run.returncode, run.stdout) == (2, "")
    assert lines == [f"pytest-vram estimate: model {str(path)!r}{message}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: model"),
        (["tiny-llama", "--batch", "x"], "argument --batch: invalid int value: 'x'"),
        (["tiny-llama", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_arguments_exit_2_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", *args]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        f"pytest-vram estimate: {message} (see pytest-vram estimate --help)\n",
    )


def test_libraries_import_chatter_stays_out_of_stderr(tmp_path: Path) -> None:
    """A fresh process, as a user runs it: QLoRA imports peft, which imports bitsandbytes (its
    'Failed to load CPU gemm_4bit_forward from kernels-community' line), peft reads
    transformers' deprecated is_gradient_checkpointing and, preparing a 4-bit model for
    checkpointing, calls the deprecated gradient_checkpointing_enable, and the DeepSpeed column
    imports DeepSpeed, which guesses its accelerator aloud. None of that is the estimate's."""
    args = ["tiny-llama", "--method", "qlora", "--grad-ckpt", "--zero", "2", "--ranks", "2"]
    args += ["--seq", "16"]
    run = estimate_process(tmp_path, *args)
    assert run.returncode == 0, run.stderr
    assert "  DeepSpeed estimator    " in run.stdout
    assert run.stderr == ""
