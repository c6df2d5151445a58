"""Real-size cases on the fake meter from a test: device="fake", capacity_gb, baselines/fake/."""

from __future__ import annotations

import json
import re

from conftest import output

SEVEN_B = """
import pytest

@pytest.mark.vram_budget(gb=80, device="fake", model="llama-7b", batch=1, seq=512)
def test_full_adamw_7b(vram):
    r = vram.step()
    assert r.meter == "fake" and r.total_params == 6_738_415_616

@pytest.mark.vram_budget(gb=80, device="fake", capacity_gb=24, model="llama-7b", batch=1, seq=512)
def test_does_not_fit_a_24gb_card(vram):
    vram.step()

@pytest.mark.vram_budget(gb=80, capacity_gb=80, model="llama-7b", batch=1, seq=512)
def test_fits_per_case(vram):
    vram.step(device="fake")
"""


def test_real_sizes_and_capacity_on_the_fake_meter(vram_project) -> None:
    vram_project.write(SEVEN_B)
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=2, failed=1)
    text = output(result)
    assert "out of memory predicted: peak " in text
    assert re.search(r"exceeds the device's 24\.00+ GiB by ", text), text
    doc = json.loads((vram_project.path / "baselines" / "fake" / "test_mem.json").read_text())
    entries = doc["entries"]
    assert set(entries) == {
        "test_full_adamw_7b",
        "test_does_not_fit_a_24gb_card",
        "test_fits_per_case",
    }
    # The host meter never ran: no host baselines were written.
    assert not (vram_project.path / "baselines" / "host-cpu").exists()


def test_bad_capacity_fails_that_test(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=1, model="tiny-llama", capacity_gb=-1)
        def test_capacity(vram):
            vram.step()
        """
    )
    result = vram_project.run()
    result.assert_outcomes(errors=1)  # found at collection, failed at its setup
    assert "capacity_gb=-1 must be > 0 (GiB of device memory)" in output(result)


def test_bad_device_in_a_step_fails_that_test(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=1, model="tiny-llama")
        def test_device(vram):
            vram.step(device="tpu")
        """
    )
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    assert "vram.step: device='tpu'; choose one of: host, cuda, fake" in output(result)


def test_a_case_the_fake_meter_cannot_trace_is_named_at_collection(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=1, device="fake", model="tiny-qwen2-vl")
        def test_vl(vram):
            vram.step()
        """
    )
    result = vram_project.run()
    result.assert_outcomes(errors=1)  # found at collection, failed at its setup
    assert "tiny-qwen2-vl is not supported on the fake meter: Qwen2-VL places" in output(result)
