"""Bad input: marker arguments fail collection, bad vram.step() values fail their test, bad
options and ini values are usage errors; every message names the argument and the bad value."""

from __future__ import annotations

import pytest

from conftest import SMALL, output

USAGE = pytest.ExitCode.USAGE_ERROR
PREFIX = "ERROR: test_mem.py::test_a: @pytest.mark.vram_budget: "


def marked(marker_args: str, body: str = f"vram.step({SMALL})") -> str:
    return f"""
        import pytest

        @pytest.mark.vram_budget({marker_args})
        def test_a(vram):
            {body}

        def test_other():
            pass
    """


def assert_usage_error(result: pytest.RunResult, *lines: str) -> None:
    text = output(result)
    assert result.ret == USAGE, text
    assert "Traceback" not in text, text
    assert "INTERNALERROR" not in text, text
    result.stderr.fnmatch_lines(list(lines))
    assert " passed" not in text and " failed" not in text  # nothing ran


@pytest.mark.parametrize(
    ("marker_args", "message"),
    [
        ("", "gb is missing: write @pytest.mark.vram_budget(gb=<GiB>)"),
        ("1", "takes keyword arguments only, got positional (1,); write gb=..."),
        ("gb=0", "gb=0 must be > 0 (GiB)"),
        ("gb=-1", "gb=-1 must be > 0 (GiB)"),
        ('gb="big"', "gb='big' must be a number"),
        ("gb=True", "gb=True must be a number"),
        ('gb=float("nan")', "gb=nan must be a number"),
        (
            "gb=1, colour='red'",
            "unknown keyword colour='red'; known: gb, tolerance, leak_tolerance, capacity_gb, device, model, *",
        ),
        ("gb=1, tolerance=-0.1", "tolerance=-0.1 must be >= 0 (0.05 is 5%)"),
        ("gb=1, tolerance='5%'", "tolerance='5%' must be a number"),
        ("gb=1, model='gpt-9'", "unknown model 'gpt-9'; known: *tiny-llama*"),
        ("gb=1, method='qlora-9'", "unknown method 'qlora-9'; known: *freeze, full, *lora*"),
        ("gb=1, optimizer='lion'", "unknown optimizer 'lion'; known: *adamw, *sgd*"),
        (
            "gb=1, precision='fp8'",
            "unknown precision 'fp8'; known: amp-bf16, amp-fp16, bf16, fp16, fp32",
        ),
        ("gb=1, batch=0", "batch=0 must be >= 1"),
        ("gb=1, seq=0", "seq=0 must be >= 1"),
        ("gb=1, steps=0", "steps=0 must be >= 1"),
        ("gb=1, batch=2.5", "batch=2.5 must be an integer"),
    ],
)
def test_bad_marker_is_a_collection_usage_error(vram_project, marker_args, message) -> None:
    vram_project.write(marked(marker_args))
    result = vram_project.run()
    assert_usage_error(result, PREFIX + message)


def test_every_bad_marker_is_reported_at_once(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=0)
        def test_a(vram):
            pass

        @pytest.mark.vram_budget(gb=1, seq=0)
        def test_b(vram):
            pass
        """
    )
    result = vram_project.run()
    assert_usage_error(
        result,
        PREFIX + "gb=0 must be > 0 (GiB)",
        "ERROR: test_mem.py::test_b: @pytest.mark.vram_budget: seq=0 must be >= 1",
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('vram.step(model="gpt-9")', "vram.step: unknown model 'gpt-9'; known: *tiny-llama*"),
        ('vram.step(model="tiny-llama", method="x")', "vram.step: unknown method 'x'; known: *"),
        ("vram.step(batch=0)", "vram.step: batch=0 must be >= 1"),
        ("vram.step(seq=-5)", "vram.step: seq=-5 must be >= 1"),
        ("vram.step(colour='red')", "vram.step: unknown step argument 'colour'; known: model, *"),
        (
            "vram.step(method_options={'rank': 8})",
            "vram.step: method_options: full has no option 'rank'; its options: none",
        ),
        (
            "vram.step(method='lora', method_options={'rank': 'eight'})",
            "vram.step: method_options: option rank='eight' of lora must be int",
        ),
    ],
)
def test_bad_step_values_fail_that_test(vram_project, call, message) -> None:
    vram_project.write(marked(f"gb=1, {SMALL}", body=call))
    result = vram_project.run()
    result.assert_outcomes(failed=1, passed=1)  # test_other still runs
    result.stdout.fnmatch_lines([message, "FAILED test_mem.py::test_a*"])
    assert "Traceback" not in output(result)


def test_missing_model_in_step_says_model_is_required(vram_project) -> None:
    vram_project.write(marked("gb=1", body="vram.step(batch=1)"))
    result = vram_project.run()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["vram.step: model is required, e.g. model='tiny-llama'"])


def test_bad_step_message_is_shown_once(vram_project) -> None:
    """pytest.fail() inside ``except SpecError`` chains the SpecError: the text shows twice."""
    vram_project.write(marked(f"gb=1, {SMALL}", body="vram.step(batch=0)"))
    result = vram_project.run()
    result.assert_outcomes(failed=1, passed=1)
    assert "During handling of the above exception" not in output(result)
    shown = [
        line
        for line in result.outlines
        if "batch=0 must be >= 1" in line and not line.startswith("FAILED")  # short summary
    ]
    assert shown == ["vram.step: batch=0 must be >= 1"]


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (
            ["--vram-tolerance=-1"],
            {},
            "ERROR: --vram-tolerance='-1' must be a number >= 0 (0.05 is 5%)",
        ),
        (["--vram-tolerance=abc"], {}, "ERROR: --vram-tolerance='abc' is not a number"),
        (["--vram-timeout=0"], {}, "ERROR: --vram-timeout='0' must be a number of seconds > 0"),
        (["--vram-device=tpu"], {}, "ERROR: --vram-device='tpu'; choose one of: host, cuda, fake"),
        (
            ["--vram-peak-source=max"],
            {},
            "ERROR: --vram-peak-source='max'; choose one of: allocated, reserved, nvml",
        ),
        (["--vram-import=my-patch"], {}, "ERROR: --vram-import: 'my-patch' is not a module name"),
        (
            [],
            {"vram_tolerance": "abc"},
            "ERROR: ini vram_tolerance = 'abc': --vram-tolerance='abc' is not a number",
        ),
        (
            [],
            {"vram_timeout": "-3"},
            "ERROR: ini vram_timeout = '-3': --vram-timeout='-3' must be a number of seconds > 0",
        ),
        ([], {"vram_update": "maybe"}, "ERROR: ini vram_update = 'maybe': expected true or false*"),
    ],
)
def test_bad_option_is_a_usage_error(vram_project, args, ini, message) -> None:
    vram_project.ini(**ini)
    vram_project.write(marked("gb=1"))
    result = vram_project.run(*args)
    assert_usage_error(result, message)


def test_marked_test_that_measures_nothing_fails(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=0.5)
        def test_a(vram):
            pass

        @pytest.mark.vram_budget(gb=2)
        def test_without_fixture():
            pass
        """
    )
    result = vram_project.run()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "marked vram_budget(gb=0.5) but measured nothing: "
            "call vram.step(...) or vram.measure(...) with the vram fixture",
        ]
    )
    result.stdout.fnmatch_lines(["marked vram_budget(gb=2) but measured nothing: *"])


def test_gpu_without_gpu_is_a_usage_error(vram_project) -> None:
    vram_project.write(marked("gb=1"))
    result = vram_project.run("--gpu")
    assert_usage_error(result, "ERROR: --gpu was given but no GPU is visible to torch (*)*")
    assert "run without --gpu to measure on the host meter" in output(result)


def test_incompatible_method_and_optimizer_in_the_marker_fail_at_collection(pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vram_budget(gb=1, model="tiny-llama", method="lora", optimizer="galore-adamw")
        def test_a(vram):
            vram.step()
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert_usage_error(
        result, "ERROR: test_*.py::test_a: @pytest.mark.vram_budget: lora with galore-adamw: *"
    )
