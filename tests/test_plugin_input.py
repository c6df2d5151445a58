"""Bad input: a bad marker fails its own test (the rest of the session runs), bad vram.step()
values fail their test, bad options and ini values are usage errors; every message names the
argument and the bad value."""

from __future__ import annotations

import re

import pytest

from conftest import LABEL, SMALL, output

USAGE = pytest.ExitCode.USAGE_ERROR
PREFIX = "test_mem.py::test_a: @pytest.mark.vram_budget: "


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
    assert not re.search(r"\d+ (passed|failed)", text), text  # nothing ran


def assert_marker_error(result: pytest.RunResult, *lines: str, passed: int = 1) -> None:
    """The marked test errors at setup with ``lines``; the others ran and passed."""
    text = output(result)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    result.assert_outcomes(errors=1, passed=passed)
    result.stdout.fnmatch_lines(["*_ ERROR at setup of test_a _*", *lines])


@pytest.mark.parametrize(
    ("marker_args", "message"),
    [
        ("", "gb is missing: write @pytest.mark.vram_budget(gb=<GiB>)"),
        ("1", "takes keyword arguments only, got positional (1,); write gb=..."),
        ("gb=0", "gb=0 must be > 0 (GiB)"),
        ("gb=-1", "gb=-1 must be > 0 (GiB)"),
        ('gb="big"', "gb='big' is not a size: write a number (GiB) or a number with its unit, *"),
        ("gb=True", "gb=True must be a number (GiB) or a size with its unit, e.g. '512MiB'"),
        ('gb=float("nan")', "gb=nan must be a number (GiB) or a size with its unit, *"),
        ('gb="24GB"', "gb='24GB': GB is ambiguous (*): write '24GiB' (GiB = 2**30 bytes) *"),
        (
            "gb=1, colour='red'",
            "unknown keyword colour='red'; known: gb, tolerance, leak_tolerance, capacity_gb, device, model, *",
        ),
        # a misspelt gb= is named, not reported as "gb is missing"
        ("gbb=1", "unknown keyword gbb=1; did you mean gb? known: gb, tolerance, *"),
        ("gb=1, modle='tiny-llama'", "unknown keyword modle='tiny-llama'; did you mean model? *"),
        ("gb=1, tolerance=-0.1", "tolerance=-0.1 must be >= 0 (0.05 is 5%)"),
        (
            "gb=1, tolerance=5",
            "tolerance=5 is more than 1: write a fraction of 1 or less (0.05) or a percentage ('5%')",
        ),
        ("gb=1, leak_tolerance='150%'", "leak_tolerance='150%' must be 100% or less"),
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
        (
            "gb=1, model='tiny-llama', offload='optimizer'",
            "offload='optimizer' needs zero=1, 2 or 3; got zero=None (no DeepSpeed)",
        ),
    ],
)
def test_bad_marker_fails_its_own_test(vram_project, marker_args, message) -> None:
    vram_project.write(marked(marker_args))
    result = vram_project.run()
    assert_marker_error(result, PREFIX + message)


def test_bad_markers_fail_only_their_tests_in_every_file(vram_project) -> None:
    vram_project.write(
        """
        import pytest

        @pytest.mark.vram_budget(gb=0)
        def test_a(vram):
            pass

        @pytest.mark.vram_budget(gb=1, seq=0)
        def test_b(vram):
            pass

        def test_c():
            pass
        """
    )
    vram_project.write("def test_elsewhere():\n    pass\n", name="test_second")
    result = vram_project.run()
    text = output(result)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text
    result.assert_outcomes(errors=2, passed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_a _*",
            PREFIX + "gb=0 must be > 0 (GiB)",
            "*_ ERROR at setup of test_b _*",
            "test_mem.py::test_b: @pytest.mark.vram_budget: seq=0 must be >= 1",
        ]
    )


def test_a_deselected_bad_marker_does_not_fail(vram_project) -> None:
    vram_project.write(marked("gbb=1"))
    result = vram_project.run("-k", "test_other")
    assert result.ret == pytest.ExitCode.OK, output(result)
    result.assert_outcomes(passed=1, deselected=1)


def test_a_case_the_fake_meter_cannot_trace_fails_only_its_test(vram_project) -> None:
    vram_project.write(marked('gb=1, device="fake", model="tiny-qwen2-vl"', body="vram.step()"))
    result = vram_project.run()
    assert_marker_error(
        result, PREFIX + "tiny-qwen2-vl is not supported on the fake meter: Qwen2-VL places *"
    )


def test_unit_strings_size_budget_and_capacity(vram_project) -> None:
    vram_project.write(marked(f'gb="512MiB", {SMALL}', body='vram.step(capacity_gb="1KiB")'))
    result = vram_project.run("--vram-update")
    result.assert_outcomes(failed=1, passed=1)
    text = output(result)
    # under the 512 MiB budget, over the 1 KiB capacity
    assert "exceeds budget" not in text, text
    result.stdout.re_match_lines(
        [r"^out of memory predicted: peak [\d.]+ MiB exceeds the device's 1\.000 KiB by [\d.]+ MiB"]
    )
    recorded = vram_project.baseline()["entries"]["test_a"]
    assert list(recorded) == [LABEL]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('vram.step(model="gpt-9")', "vram.step: unknown model 'gpt-9'; known: *tiny-llama*"),
        ('vram.step(model="tiny-llama", method="x")', "vram.step: unknown method 'x'; known: *"),
        ("vram.step(batch=0)", "vram.step: batch=0 must be >= 1"),
        ("vram.step(seq=-5)", "vram.step: seq=-5 must be >= 1"),
        ("vram.step(colour='red')", "vram.step: unknown step argument 'colour'; known: model, *"),
        (
            "vram.step(bacth=2)",
            "vram.step: unknown step argument 'bacth'; did you mean batch? known: model, *",
        ),
        (
            "vram.step(capcity_gb=24)",
            "vram.step: unknown step argument 'capcity_gb'; did you mean capacity_gb? known: *",
        ),
        ("vram.step(capacity_gb='24GB')", "vram.step: capacity_gb='24GB': GB is ambiguous *"),
        (
            "vram.step(zero=0, offload='optimizer')",
            "vram.step: offload='optimizer' needs zero=1, 2 or 3; got zero=0 (ZeRO-0 does not *",
        ),
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
        (["--vram-tolerance=-1"], {}, "ERROR: --vram-tolerance='-1' must be >= 0 (0.05 is 5%)"),
        (
            ["--vram-tolerance=abc"],
            {},
            "ERROR: --vram-tolerance='abc' is not a number: write a fraction (0.05) or a "
            "percentage ('5%')",
        ),
        # was silently 500%
        (
            ["--vram-tolerance", "5"],
            {},
            "ERROR: --vram-tolerance='5' is more than 1: write a fraction of 1 or less (0.05) "
            "or a percentage ('5%')",
        ),
        (["--vram-tolerance=150%"], {}, "ERROR: --vram-tolerance='150%' must be 100% or less"),
        (["--vram-timeout=0"], {}, "ERROR: --vram-timeout='0' must be a number of seconds > 0"),
        # was accepted, then every case failed with an OverflowError
        (
            ["--vram-timeout=1e12"],
            {},
            "ERROR: --vram-timeout='1e12' is more than a week: at most 604800 seconds",
        ),
        (["--vram-device=tpu"], {}, "ERROR: --vram-device='tpu'; choose one of: host, cuda, fake"),
        (
            ["--vram-peak-source=max"],
            {},
            "ERROR: --vram-peak-source='max'; choose one of: allocated, reserved, nvml",
        ),
        (["--vram-import=my-patch"], {}, "ERROR: --vram-import: 'my-patch' is not a module name"),
        (
            ["--vram-snapshots=sometimes"],
            {},
            "ERROR: --vram-snapshots='sometimes'; choose one of: failed, all, none",
        ),
        (
            [],
            {"vram_snapshots": "every"},
            "ERROR: ini vram_snapshots = 'every': --vram-snapshots='every'; choose one of: *",
        ),
        (["--vram-html=r\0.html"], {}, "ERROR: --vram-html='r\\x00.html': a path cannot hold*"),
        (
            [],
            {"vram_tolerance": "abc"},
            "ERROR: ini vram_tolerance = 'abc': --vram-tolerance='abc' is not a number: *",
        ),
        (
            [],
            {"vram_tolerance": "5"},
            "ERROR: ini vram_tolerance = '5': --vram-tolerance='5' is more than 1: write a "
            "fraction of 1 or less (0.05) or a percentage ('5%')",
        ),
        (
            [],
            {"vram_timeout": "-3"},
            "ERROR: ini vram_timeout = '-3': --vram-timeout='-3' must be a number of seconds > 0",
        ),
        (
            [],
            {"vram_timeout": "1e300"},
            "ERROR: ini vram_timeout = '1e300': --vram-timeout='1e300' is more than a week: *",
        ),
        ([], {"vram_update": "maybe"}, "ERROR: ini vram_update = 'maybe': expected true or false*"),
        # was an INTERNALERROR (ValueError: embedded null byte) when the folder was made
        (
            ["--vram-baselines=base\0x"],
            {},
            "ERROR: --vram-baselines='base\\x00x': a path cannot hold a NUL byte",
        ),
        (["--vram-json=r\0.json"], {}, "ERROR: --vram-json='r\\x00.json': a path cannot hold*"),
    ],
)
def test_bad_option_is_a_usage_error(vram_project, args, ini, message) -> None:
    vram_project.ini(**ini)
    vram_project.write(marked("gb=1"))
    result = vram_project.run(*args)
    assert_usage_error(result, message)


def test_a_nul_in_a_pyproject_path_option_is_a_usage_error(vram_project) -> None:
    (vram_project.path / "tox.ini").unlink()
    (vram_project.path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nvram_baselines = "base\\u0000x"\n'
    )
    vram_project.write(marked("gb=1"))
    result = vram_project.run("--vram-update")
    assert_usage_error(
        result,
        "ERROR: ini vram_baselines = 'base\\x00x': --vram-baselines='base\\x00x': a path "
        "cannot hold a NUL byte",
    )


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


def test_incompatible_method_and_optimizer_in_the_marker_fail_that_test(vram_project) -> None:
    vram_project.write(
        marked('gb=1, model="tiny-llama", method="lora", optimizer="galore-adamw"', "vram.step()")
    )
    assert_marker_error(vram_project.run(), PREFIX + "lora with galore-adamw: *")


@pytest.mark.parametrize(
    ("args", "ini"),
    [
        (["--vram-tolerance=2%"], {}),
        (["--vram-tolerance", "0.02"], {}),
        ([], {"vram_tolerance": "2%"}),
    ],
)
def test_tolerance_option_takes_a_fraction_or_a_percentage(vram_project, args, ini) -> None:
    vram_project.ini(**ini)
    vram_project.write(
        """
        def test_tolerance(request):
            from pytest_vram.plugin import SESSION

            assert request.config.stash[SESSION].settings.tolerance == 0.02
        """
    )
    vram_project.run(*args).assert_outcomes(passed=1)


def test_the_longest_timeout_accepted_is_one_a_case_can_wait() -> None:
    """The worker waits for a case with ``multiprocessing.connection.wait``, whose poll takes
    a C int of milliseconds: 1e7 s raised OverflowError there, in every case."""
    import multiprocessing
    import multiprocessing.connection

    from pytest_vram.options import _timeout

    longest = _timeout("604800")
    reader, writer = multiprocessing.Pipe(duplex=False)
    writer.send("done")
    assert multiprocessing.connection.wait([reader], timeout=longest) == [reader]
    for beyond in ("604800.5", "1e7", "inf"):
        with pytest.raises(pytest.UsageError, match=f"--vram-timeout='{beyond}'"):
            _timeout(beyond)
