"""``pytest-vram estimate``: the fake meter's step beside DeepSpeed's estimator and
LLaMA-Factory's table, for zoo models and config.json files."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import estimate_json
from pytest_vram import references, zoo
from pytest_vram.cli import main
from pytest_vram.estimate import Estimate, deepspeed_figure
from pytest_vram.estimate_cli import capacity_line, json_object, text_lines
from pytest_vram.meters.fake import FakeMeter
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.step import run_step

# deepspeed logs to a stdout handler it makes on import: bind it to a stream outliving capsys.
with contextlib.redirect_stdout(sys.__stderr__):
    from deepspeed.runtime.zero import stage3, stage_1_and_2

GIB = 2**30
LLAMA_7B_PARAMS = 6_738_415_616
QWEN_32B_EMBEDDING = 152_064 * 5_120


def test_json_is_run_step_under_the_fake_meter(capsys: pytest.CaptureFixture[str]) -> None:
    data = estimate_json(capsys, "tiny-llama", "--batch", "2", "--seq", "32")
    expected = run_step(StepSpec(model="tiny-llama", batch=2, seq=32), FakeMeter()).to_dict()
    for key in ("label", "peak_bytes", "step_peak_bytes", "breakdown", "total_params", "spec"):
        assert data["result"][key] == expected[key], key
    assert data["zero_simulation"] is None
    assert data["columns"]["deepspeed"] == {
        "unavailable": "DeepSpeed's estimators cover ZeRO-2 and ZeRO-3; "
        "this step runs without DeepSpeed"
    }


def test_llama_7b_breakdown_and_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "llama-7b", "--method", "full", "--optimizer", "adamw"]
    args += ["--precision", "bf16", "--batch", "1", "--seq", "512"]
    assert main([*args, "--capacity-gb", "48"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^  parameters +12\.55 GiB$", out, re.M), out
    assert re.search(
        r"^  LLaMA-Factory table +60 GB \(Full \(pure_bf16\), 16 bits, 7B\)$", out, re.M
    )
    peak = re.search(r"^  peak +([\d.]+) GiB$", out, re.M)
    line = re.search(
        r"^capacity 48\.00 GiB: OUT OF MEMORY predicted by ([\d.]+) GiB \(peak ([\d.]+) GiB\)$",
        out,
        re.M,
    )
    assert peak is not None and line is not None, out
    assert abs(float(line.group(1)) - (float(peak.group(1)) - 48)) < 0.01
    assert abs(float(line.group(2)) - float(peak.group(1))) < 0.01

    assert main([*args, "--capacity-gb", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    result = data["result"]
    assert result["breakdown"]["param_bytes"] == 2 * LLAMA_7B_PARAMS
    assert result["total_params"] == data["base_params"] == LLAMA_7B_PARAMS
    capacity = data["capacity"]
    assert capacity["fits"] is True
    assert capacity["headroom_bytes"] == 64 * GIB - result["peak_bytes"]
    assert capacity["message"].startswith("capacity 64.00 GiB: FITS, ")
    assert data["columns"]["llama_factory"]["gb"] == 60


def test_capacity_at_the_peak_fits_and_one_byte_less_does_not() -> None:
    spec = StepSpec(model="tiny-llama")
    peak = Breakdown(activation_bytes=GIB)
    result = MemoryResult(spec.label, "fake", "fake", GIB, (GIB,), peak, spec=spec)

    def at(capacity: int | None) -> Estimate:
        return Estimate(spec, result, 1, "no DeepSpeed", None, capacity)

    assert capacity_line(at(None)) is None and json_object(at(None))["capacity"] is None
    assert capacity_line(at(GIB)) == "capacity 1.000 GiB: FITS, 0 B to spare (peak 1.000 GiB)"
    short = json_object(at(GIB - 1))["capacity"]
    assert (short["fits"], short["headroom_bytes"]) == (False, -1)
    # read "1.00 GiB ... predicted by 0.00 GiB": digits enough to tell capacity and peak apart
    assert short["message"] == (
        "capacity 0.999999999 GiB: OUT OF MEMORY predicted by 1 B (peak 1.000000000 GiB)"
    )
    assert list(text_lines(at(GIB - 1)))[-1] == short["message"]


@pytest.mark.parametrize(
    ("given", "capacity"),
    [("24GiB", 24 * GIB), ("512 MiB", 2**29), ("0.5", GIB // 2), ("48", 48 * GIB)],
)
def test_capacity_takes_a_size_with_its_unit_as_the_marker_does(
    given: str, capacity: int, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["estimate", "tiny-llama", "--seq", "8", "--capacity-gb", given, "--json"])
    assert json.loads(capsys.readouterr().out)["capacity"]["capacity_bytes"] == capacity


def test_qwen_32b_zero3_deepspeed_column(capsys: pytest.CaptureFixture[str]) -> None:
    data = estimate_json(capsys, "qwen2.5-32b", "--seq", "32", "--zero", "3", "--offload", "both")
    total = zoo.MODELS["qwen2.5-32b"].published_params
    assert data["result"]["total_params"] == total
    column = data["columns"]["deepspeed"]
    assert column["largest_layer_params"] == QWEN_32B_EMBEDDING  # embed_tokens and lm_head
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total, QWEN_32B_EMBEDDING, 1, 1, cpu_offload=True, cpu_offload_params=True, zero_init=False
    )
    assert (column["gpu_bytes"], column["cpu_bytes"]) == (gpu, cpu)
    # The same line of the table the *_all_cold function prints.
    stage3.estimate_zero3_model_states_mem_needs_all_cold(total, QWEN_32B_EMBEDDING)
    printed = capsys.readouterr().out
    line = f" {cpu / GIB:7.2f}GB | {gpu / GIB:6.2f}GB | "
    assert any(
        row.startswith(line) and row.endswith("zero_init=0") and "offload_param=none" not in row
        for row in printed.splitlines()
    ), printed
    assert data["zero_simulation"] == "per-rank"


def test_zero_prints_the_simulation_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "tiny-llama", "--zero", "2", "--ranks", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spec = StepSpec(model="tiny-llama", zero=2, ranks=2)
    assert data["zero_simulation"] == "per-rank"
    assert data["result"]["peak_bytes"] == run_step(spec, FakeMeter()).peak_bytes
    assert len(data["result"]["ranks"]) == 2
    assert main(["estimate", "tiny-llama", "--zero", "2", "--ranks", "2"]) == 0
    assert "  ZeRO-2 per rank (max over 2 ranks)" in capsys.readouterr().out


def test_qwen_32b_h100_article_quotes_deepspeed_printed_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The article on full fine-tuning Qwen2.5-32B on H100s with LLaMA-Factory quotes DeepSpeed's
    estimator; its count is AutoModel's (no lm_head), as in DeepSpeed's docs, on 1 GPU."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        bare = AutoModel.from_config(zoo.build_config("qwen2.5-32b"))
    assert sum(p.numel() for p in bare.parameters()) == references.QWEN_32B_DEEPSPEED_PARAMS
    assert (
        references.QWEN_32B_DEEPSPEED_PARAMS + QWEN_32B_EMBEDDING
        == zoo.MODELS["qwen2.5-32b"].published_params
    )

    stage3.estimate_zero3_model_states_mem_needs_all_cold(
        references.QWEN_32B_DEEPSPEED_PARAMS, references.QWEN_32B_DEEPSPEED_LARGEST_LAYER
    )
    printed = capsys.readouterr().out
    for figure in references.QWEN_32B_DEEPSPEED:
        spec = StepSpec(model="qwen2.5-32b", zero=figure.zero, offload=figure.offload)
        column = deepspeed_figure(
            spec, references.QWEN_32B_DEEPSPEED_PARAMS, references.QWEN_32B_DEEPSPEED_LARGEST_LAYER
        )
        assert not isinstance(column, str), column
        gpu, cpu = column.gpu_bytes / GIB, column.cpu_bytes / GIB
        row = f" {cpu:7.2f}GB | {gpu:6.2f}GB | "
        assert any(line.startswith(row) for line in printed.splitlines()), (row, printed)
        # Rounded as the article quotes them.
        assert round(gpu, len(str(figure.gpu_gb).partition(".")[2])) == figure.gpu_gb, figure
        if figure.cpu_gb is not None:
            assert round(cpu) == figure.cpu_gb, figure


def test_zero2_deepspeed_column_follows_offload_and_ranks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = estimate_json(
        capsys, "tiny-llama", "--zero", "2", "--offload", "optimizer", "--ranks", "4"
    )
    column = data["columns"]["deepspeed"]
    cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        data["result"]["total_params"], 4, 1, cpu_offload=True
    )
    assert (column["gpu_bytes"], column["cpu_bytes"]) == (gpu, cpu)
    assert column["options"] == "offload_optimizer=cpu"


def test_config_json_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path / "config.json"
    config.to_json_file(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    before = dict(zoo.MODELS)
    data = estimate_json(capsys, str(path), "--seq", "16")
    assert data["result"]["total_params"] == data["base_params"] == params
    assert data["result"]["breakdown"]["param_bytes"] == 2 * params
    assert data["result"]["label"].startswith(f"{path} full adamw bf16")
    assert dict(zoo.MODELS) == before  # the entry lasts as long as the estimate


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-model"], "unknown model 'no-such-model'; known: "),
        (["tiny-llama", "--method", "nope"], "unknown method 'nope'"),
        (["tiny-llama", "--offload", "both"], "offload='both' needs zero=3; got zero=None"),
        (["tiny-llama", "--zero", "2", "--offload", "param"], "needs zero=3; got zero=2"),
        (["tiny-llama", "--capacity-gb", "0"], "--capacity-gb=0.0 must be > 0"),
        (["tiny-llama", "--capacity-gb", "24GB"], "--capacity-gb='24GB': GB is ambiguous"),
        (["tiny-llama", "--capacity-gb", "lots"], "--capacity-gb='lots' is not a size"),
        (["tiny-llama", "--capacity-gb", "inf"], "--capacity-gb=inf must be a number (GiB)"),
        # an overflow inside torch before
        (["tiny-llama", "--seq", str(10**30)], f"seq={10**30} must be at most 16,777,216"),
    ],
)
def test_bad_input_exits_2_with_the_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pytest-vram estimate: ")
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_bad_config_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8}))
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model {str(path)!r}: model_type 'no-such-arch' has no causal-LM" in err
    path.write_text("{}")
    assert main(["estimate", str(path)]) == 2
    assert "needs a string 'model_type'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "optimizer", "precision", "params", "expected"),
    [
        ("full", "adamw", "bf16", LLAMA_7B_PARAMS, ("Full (pure_bf16)", 7, 60)),
        ("full", "adamw", "amp-bf16", LLAMA_7B_PARAMS, ("Full (bf16 or fp16)", 7, 120)),
        ("lora", "adamw", "bf16", 14_770_033_664, ("Freeze/LoRA/GaLore/APOLLO/BAdam", 14, 32)),
        (
            "full",
            "galore-adamw",
            "bf16",
            32_763_876_352,
            ("Freeze/LoRA/GaLore/APOLLO/BAdam", 30, 64),
        ),
        ("qlora", "adamw", "bf16", 70_553_706_496, ("QLoRA", 70, 48)),
        ("lora-8bit", "adamw", "bf16", LLAMA_7B_PARAMS, ("QLoRA", 7, 10)),
        (
            "freeze",
            "adamw",
            "bf16",
            1_777_088_000,
            ("Freeze/LoRA/GaLore/APOLLO/BAdam", None, 2 * 1.777088),
        ),
        ("full", "sgd", "bf16", LLAMA_7B_PARAMS, None),
        ("lora", "adamw", "amp-bf16", LLAMA_7B_PARAMS, None),
        ("prefix", "adamw", "bf16", LLAMA_7B_PARAMS, None),
    ],
)
def test_llama_factory_table_lookup(
    method: str,
    optimizer: str,
    precision: str,
    params: int,
    expected: tuple[str, int | None, float] | None,
) -> None:
    value = references.llama_factory(method, optimizer, precision, params)
    if expected is None:
        assert value is None
        return
    assert value is not None
    assert (value.row.method, value.column) == expected[:2]
    assert value.gb == pytest.approx(expected[2])


def test_deepspeed_column_counts_the_base_model_not_packed_bytes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A QLoRA trace holds packed 4-bit bytes (two parameters per uint8 element); DeepSpeed's
    estimator takes the model's parameter count."""
    data = estimate_json(capsys, "tiny-llama", "--method", "qlora", "--zero", "2", "--ranks", "2")
    assert data["columns"]["deepspeed"]["total_params"] == data["base_params"]
    assert data["result"]["total_params"] < data["base_params"]
    assert "uint8" in data["result"]["param_dtype_bytes"]


def test_method_and_optimizer_options_reach_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    lora = [
        "tiny-llama",
        "--seq",
        "16",
        "--method",
        "lora",
        "--method-option",
        "rank=32",
        "--method-option",
        'targets=["q_proj", "v_proj"]',
    ]
    data = estimate_json(capsys, *lora, "--optimizer-option", "implementation=fused")
    spec = StepSpec(
        model="tiny-llama",
        seq=16,
        method="lora",
        method_options={"rank": 32, "targets": ["q_proj", "v_proj"]},
        optimizer_options={"implementation": "fused"},
    )
    assert data["result"]["spec"] == spec.to_dict()
    # The fused step holds none of foreach's sqrt temporaries over the adapters: its first
    # step, whose peak is the optimizer's, is lower.
    foreach = estimate_json(capsys, *lora)
    assert data["result"]["step_peak_bytes"][0] < foreach["result"]["step_peak_bytes"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer-option", "implementation=fast"], "implementation='fast' is not one of"),
        (["--method-option", "r=8", "--method", "lora"], "lora has no option 'r'"),
        (["--optimizer-option", "=3"], "argument --optimizer-option: '=3' is not KEY=VALUE"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", "tiny-llama", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pytest-vram estimate: ") and message in err
    assert "Traceback" not in err
