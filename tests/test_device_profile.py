"""What a GPU process holds besides its step's tensors: torch's cuBLAS workspaces (sized by
``parseChosenWorkspaceSize``'s rules, placed by the caching allocator's), the CUDA context and
NCCL's buffers; and the predictions and calibration that carry them. No GPU runs here: the
rules are torch's, hand-worked, and GPU results are recorded ones."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from pytest_vram.calibration import Prediction, error_of, outside_allocator_lines
from pytest_vram.cli import main
from pytest_vram.device_profile import (
    CONTEXT_BYTES,
    DeviceProfile,
    DeviceProfileError,
    cublas_workspace_bytes,
)
from pytest_vram.result import Breakdown, MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.units import format_bytes

KIB, MIB = 2**10, 2**20


@pytest.mark.parametrize(
    ("capability", "environ", "nbytes"),
    [
        # ":4096:2:16:8": two 4 MiB and eight 16 KiB workspace chunks, before Hopper.
        ((8, 0), {}, 4096 * KIB * 2 + 16 * KIB * 8),
        (None, {}, 8_519_680),
        # 32 MiB on Hopper and Blackwell (compute capability 9.x, 10.x, 12.x).
        ((9, 0), {}, 32 * MIB),
        ((10, 0), {}, 32 * MIB),
        ((12, 0), {}, 32 * MIB),
        ((8, 9), {}, 8_519_680),
        # The variable's :SIZE_KiB:COUNT pairs, summed; deterministic cuBLAS's usual settings.
        ((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, 128 * KIB),
        ((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, 32 * MIB),
        ((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}, 8_519_680),
        # One torch cannot parse: it warns and keeps its default.
        ((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "4096"}, 32 * MIB),
    ],
)
def test_the_cublas_workspace_follows_torchs_rules(
    capability: tuple[int, int] | None, environ: dict[str, str], nbytes: int
) -> None:
    assert cublas_workspace_bytes(capability, environ) == nbytes


def test_cublaslt_gets_a_workspace_of_its_own_only_when_not_unified() -> None:
    unified = DeviceProfile.named("a100", {"CUBLASLT_WORKSPACE_SIZE": "4096"})
    assert unified.workspace_bytes == 8_519_680  # Lt shares cuBLAS's (torch's default)
    apart = DeviceProfile.named("a100", {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"})
    assert apart.workspace_bytes == 8_519_680 + 1024 * KIB
    sized = DeviceProfile.named(
        "a100", {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0", "CUBLASLT_WORKSPACE_SIZE": "4096"}
    )
    assert sized.workspace_bytes == 8_519_680 + 4096 * KIB


def test_two_workspaces_share_one_20_mib_segment_below_hopper_and_take_their_own_above() -> None:
    """The caching allocator's rules, by hand: a request between 1 and 10 MiB gets a 20 MiB
    segment (kLargeBuffer), which the second 8.125 MiB workspace splits; 32 MiB requests get
    segments of their size (rounded to 2 MiB)."""
    a100 = DeviceProfile.named("a100", {})
    assert a100.workspaces_bytes() == 2 * 8_519_680
    assert a100.workspaces_reserved_bytes() == 20 * MIB
    h100 = DeviceProfile.named("h100", {})
    assert h100.workspaces_reserved_bytes() == 64 * MIB


@pytest.mark.parametrize(("ranks", "nccl_mib"), [(1, 0), (2, 544), (4, 688), (8, 688)])
def test_nvml_is_reserved_with_the_workspaces_and_what_the_allocator_does_not_hold(
    ranks: int, nccl_mib: int
) -> None:
    profile = DeviceProfile.named("h100", {})
    allocated, reserved, nvml = profile.predict(1000 * MIB, 1200 * MIB, ranks)
    assert allocated == 1064 * MIB
    assert reserved == 1264 * MIB
    assert nvml == 1264 * MIB + CONTEXT_BYTES + nccl_mib * MIB
    assert CONTEXT_BYTES == 426 * MIB
    assert profile.nvml_from_storage_bytes(1000 * MIB, ranks) == nvml - 200 * MIB


def test_ones_own_context_and_nccl_figures_replace_the_published_ones() -> None:
    profile = DeviceProfile.named("a100", {}, context_mib=612.5, nccl_mib=1024)
    assert profile.context_bytes == int(612.5 * MIB)
    assert profile.nccl_bytes_for(2) == profile.nccl_bytes_for(8) == 1024 * MIB
    assert "CUDA context 612 MiB, NCCL 1,024 MiB" in profile.describe(8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"context_mib": -1.0}, "context_mib=-1.0 is not a number of MiB >= 0"),
        ({"nccl_mib": float("nan")}, "nccl_mib=nan is not a number of MiB >= 0"),
        ({"context_mib": True}, "context_mib=True is not a number of MiB >= 0"),
    ],
)
def test_a_bad_figure_is_refused_by_name(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(DeviceProfileError, match=message):
        DeviceProfile.named("a100", {}, **overrides)


def test_an_unknown_gpu_name_lists_the_known_ones() -> None:
    with pytest.raises(DeviceProfileError, match=r"--gpu-model 'x100' is not known; known: v100"):
        DeviceProfile.named("x100", {})
    assert DeviceProfile.named(" H100 ", {}).capability == (9, 0)


def test_a_measured_gpu_result_gives_its_own_profile() -> None:
    """What the cuda meter recorded: the fingerprint, the compute capability and the
    variables that move the numbers (``env:NAME``)."""
    profile = DeviceProfile.from_measured(
        "nvidia-h100-80gb-hbm3",
        {"capability": "9.0", "env:CUBLAS_WORKSPACE_CONFIG": ":4096:2", "driver": "560.35"},
    )
    assert (profile.name, profile.capability) == ("nvidia-h100-80gb-hbm3", (9, 0))
    assert profile.workspace_bytes == 8 * MIB
    unknown = DeviceProfile.from_measured("nvidia-a100-sxm4-80gb", {})
    assert unknown.capability is None and unknown.workspace_bytes == 8_519_680


def gpu_nvml_result(
    nvml_mib: float, reserved_mib: float, prediction: Prediction
) -> dict[str, object]:
    """A recorded GPU case whose budget checks nvml, as a summary row's result."""
    r = MemoryResult(
        label="qwen2-0.5b lora adamw bf16 b4 s512",
        meter="cuda",
        device="nvidia-a100-sxm4-80gb",
        peak_bytes=int(nvml_mib * MIB),
        step_peak_bytes=(int(nvml_mib * MIB),),
        breakdown=Breakdown(),
        spec=StepSpec(model="qwen2-0.5b", method="lora", batch=4, seq=512),
        peak_source="nvml",
        reserved_bytes=int(reserved_mib * MIB),
        allocated_bytes=int(reserved_mib * MIB) - 40 * MIB,
        nvml_bytes=int(nvml_mib * MIB),
        prediction=prediction,
    )
    return r.to_dict()


def _prediction(reserved_mib: int) -> Prediction:
    profile = DeviceProfile.named("a100", {})
    allocated, reserved, nvml = profile.predict((reserved_mib - 50) * MIB, reserved_mib * MIB)
    return Prediction(
        (reserved_mib - 60) * MIB, allocated, reserved, nvml_bytes=nvml, device=profile.describe()
    )


def test_nvml_predictions_are_kept_and_read_against_nvml() -> None:
    p = _prediction(3000)
    assert Prediction.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.nvml_bytes == (3000 + 20 + 426) * MIB
    error = error_of(p, "nvml", 3600 * MIB)
    assert error is not None and error.source == "nvml"
    assert error.fraction == pytest.approx(3446 / 3600 - 1)
    with pytest.raises(ValueError, match=r"prediction.nvml_bytes=-1 is not an integer >= 0"):
        Prediction.from_dict({**p.to_dict(), "nvml_bytes": -1})
    with pytest.raises(ValueError, match=r"prediction.device=3 is not a string"):
        Prediction.from_dict({**p.to_dict(), "device": 3})
    # Baseline entries from before the field still load.
    old = {k: v for k, v in p.to_dict().items() if k not in ("nvml_bytes", "device")}
    assert Prediction.from_dict(old).nvml_bytes is None


def test_the_summary_sets_measured_nvml_beyond_reserved_beside_the_profiles_figure() -> None:
    """The calibration loop for the context: recorded GPU cases measured 610-700 MiB beyond
    reserved; the profile assumed 426 MiB."""
    rows = [
        {"result": gpu_nvml_result(3000 + over, 3000, _prediction(3000))}
        for over in (610, 650, 700)
    ]
    rows.append({"result": {"meter": "host", "nvml_bytes": None, "reserved_bytes": None}})
    assert list(outside_allocator_lines(rows)) == [
        "NVML beyond reserved (CUDA context, NCCL): median 650 MiB over 3 cases (610-700 MiB); "
        "the device profile assumed 426 MiB (--vram-cuda-context-mib and --vram-nccl-mib set "
        "its terms)"
    ]
    assert list(outside_allocator_lines(rows[3:])) == []


def _estimate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["estimate", "tiny-llama", "--seq", "16", "--json", *args]) == 0
    data: dict[str, object] = json.loads(capsys.readouterr().out)
    return data


def test_estimate_predicts_nvidia_smi_on_the_gpu_named(capsys: pytest.CaptureFixture[str]) -> None:
    data = _estimate_json(capsys, "--gpu-model", "h100", "--cuda-context-mib", "500")
    device = data["device"]
    result = data["result"]
    assert isinstance(device, dict) and isinstance(result, dict)
    assert device["name"] == "NVIDIA H100" and device["workspace_bytes"] == 32 * MIB
    assert device["allocated_bytes"] == result["allocated_bytes"] + 64 * MIB
    assert device["reserved_bytes"] == result["reserved_bytes"] + 64 * MIB
    assert device["nvml_bytes"] == device["reserved_bytes"] + 500 * MIB


def test_estimate_reads_a_zero_ranks_nvidia_smi_from_its_storage_peak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _estimate_json(capsys, "--zero", "3", "--ranks", "2")
    device = data["device"]
    result = data["result"]
    assert isinstance(device, dict) and isinstance(result, dict)
    assert device["allocated_bytes"] is None and device["reserved_bytes"] is None
    assert device["nvml_bytes"] == result["peak_bytes"] + 20 * MIB + (426 + 544) * MIB


def test_estimate_refuses_an_unknown_gpu_by_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "tiny-llama", "--gpu-model", "x1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pytest-vram estimate: --gpu-model 'x1' is not known; known: v100")


def test_the_html_report_sets_each_predicted_number_beside_the_measured_one() -> None:
    from pytest_vram import html_report
    from pytest_vram.verdict import Budget, judge

    measured = MemoryResult.from_dict(gpu_nvml_result(3600, 3000, _prediction(3100)))
    measured = dataclasses.replace(measured, peak_source="reserved", peak_bytes=3000 * MIB)

    def page(result: MemoryResult) -> str:
        verdict = judge(
            "t.py::test_x",
            result,
            Budget(None, 0.05),
            None,
            strict=False,
            update=True,
            record_hint="--vram-update",
        )
        return html_report.render([{**verdict.row(), "snapshot": None}])

    text = page(measured)
    cells = re.findall(
        r"<tr><th>([^<]*)</th><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", text
    )
    # Predicted (MiB): storage 3100 - 60; allocated 3100 - 50 plus two 8.125 MiB workspaces;
    # reserved 3100 plus their 20 MiB segment; nvml that plus the 426 MiB context.
    # Measured: allocated 3000 - 40, reserved 3000, nvml 3600.
    expected = [
        ("storage", 3040, None),
        ("allocated", 3050 + 16.25, 2960),
        ("reserved (checked)", 3120, 3000),
        ("nvml", 3546, 3600),
    ]
    assert cells == [
        (
            name,
            format_bytes(int(p * MIB)),
            "-" if m is None else format_bytes(m * MIB),
            "-" if m is None else f"{p / m - 1:+.1%}",
        )
        for name, p, m in expected
    ]
    assert "device profile: NVIDIA A100: 2 cuBLAS workspaces of 8.12 MiB" in text
    unsupported = dataclasses.replace(measured, prediction=Prediction(unsupported="a <reason>"))
    assert "No prediction: a &lt;reason&gt;" in page(unsupported)
