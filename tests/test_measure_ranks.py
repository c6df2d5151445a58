"""vram.measure(fn, ..., ranks=N): the user's own function on N ranks, as torchrun runs it.

The functions here start their own gloo group, as code written for torchrun does; the
DeepSpeed and Trainer functions of the shipped suite (``suites/test_user_stacks.py``) use the
same path with the engine's offload counted as host memory.
"""

from __future__ import annotations

import re
import time

import pytest
from procs import assert_gone

from conftest import VramProject, output

CASES = """
    import os
    import time
    from pathlib import Path

    import pytest

    # torch only inside the functions: they run in the worker's children, and this module is
    # imported by in-process pytester runs, which drop what they imported when they end.
    HERE = Path(__file__).parent
    NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


    def note(name, text):
        (HERE / f"{name}.{os.environ['RANK']}").write_text(text)


    def torchrun_script(mib):
        # A torchrun script's main: it starts and ends its own group.
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.ones(mib * 2**18)  # mib MiB of fp32
        dist.all_reduce(t)
        note("env", " ".join(os.environ[n] for n in NAMES) + f" {t[0].item():g}")
        dist.destroy_process_group()


    def alone():
        import torch

        return torch.ones(4)


    def one_rank_fails():
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if dist.get_rank() == 1:
            raise ValueError("bad shard 7")
        dist.barrier()


    def one_rank_hangs():
        import torch.distributed as dist

        dist.init_process_group("gloo")
        note("pid", str(os.getpid()))
        if dist.get_rank() == 1:
            time.sleep(300)
        dist.barrier()
"""


def cases(body: str) -> str:
    return CASES + body


def ranks_on_disk(project: VramProject, name: str, world: int) -> list[str]:
    return [(project.path / f"{name}.{rank}").read_text() for rank in range(world)]


def test_each_rank_gets_torchruns_environment_and_is_measured(vram_project: VramProject) -> None:
    vram_project.write(
        cases(
            """

    @pytest.mark.vram_budget(gb=1)
    def test_script(vram):
        small = vram.measure(torchrun_script, 1, ranks=2)
        big = vram.measure(torchrun_script, 4, ranks=2)
        assert [r.peak_bytes for r in small.ranks] == [2**20, 2**20]
        assert small.peak_bytes == 2**20 and big.peak_bytes == 4 * 2**20
        print("LABELS", small.label, "|", big.label)
"""
        )
    )
    result = vram_project.record("-s")
    # The all-reduce summed both ranks' ones: the group spanned both processes.
    assert ranks_on_disk(vram_project, "env", 2) == [
        "0 0 2 2 127.0.0.1 2",
        "1 1 2 2 127.0.0.1 2",
    ]
    result.stdout.fnmatch_lines(
        ["*LABELS test_mem.torchrun_script(1) r2 | test_mem.torchrun_script(4) r2"]
    )
    # Two calls with different arguments are two baseline entries.
    entries = vram_project.baseline()["entries"]["test_script"]
    assert sorted(entries) == ["test_mem.torchrun_script(1) r2", "test_mem.torchrun_script(4) r2"]
    assert [r["peak_bytes"] for r in entries["test_mem.torchrun_script(4) r2"]["ranks"]] == [
        4 * 2**20,
        4 * 2**20,
    ]
    vram_project.run().assert_outcomes(passed=1)


def test_what_goes_wrong_on_a_rank_fails_its_test_naming_the_rank(
    vram_project: VramProject,
) -> None:
    vram_project.write(
        cases(
            """

    @pytest.mark.vram_budget(gb=1)
    def test_alone(vram):
        vram.measure(alone, ranks=2)


    @pytest.mark.vram_budget(gb=1)
    def test_fails(vram):
        vram.measure(one_rank_fails, ranks=2)


    @pytest.mark.vram_budget(gb=1)
    def test_single_process_still_works(vram):
        vram.measure(alone)
"""
        )
    )
    result = vram_project.run("--vram-update")
    result.assert_outcomes(passed=1, failed=2)
    text = output(result)
    # Whichever rank reports first is the error.
    assert re.search(
        r"rank [01] of 2 failed: RuntimeError: test_mem.alone r2 ran on ranks=2 but never "
        r"initialised torch.distributed's process group",
        text,
    )
    assert "rank 1 of 2 failed: ValueError: bad shard 7" in text
    assert "INTERNALERROR" not in text


def test_a_hanging_rank_is_killed_at_the_timeout_with_its_peers(
    vram_project: VramProject,
) -> None:
    vram_project.write(
        cases(
            """

    @pytest.mark.vram_budget(gb=1)
    def test_hangs(vram):
        vram.measure(one_rank_hangs, ranks=2)
"""
        )
    )
    started = time.monotonic()
    # Long enough for both ranks to start their group and note their pids on a loaded machine,
    # far below rank 1's 300 s sleep.
    result = vram_project.run("--vram-timeout", "15")
    result.assert_outcomes(failed=1)
    assert "timed out after 15 s (--vram-timeout), killed" in output(result)
    assert time.monotonic() - started < 240
    # No rank outlives its case (an orphan the OS has not reaped yet is gone all the same).
    assert_gone({f"rank{r}": int(t) for r, t in enumerate(ranks_on_disk(vram_project, "pid", 2))})


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ("0", "ranks=0 must be >= 1"),
        ("'2'", "ranks='2' must be an integer"),
        ("True", "ranks=True must be an integer"),
    ],
)
def test_a_bad_ranks_value_is_named(vram_project: VramProject, ranks: str, message: str) -> None:
    vram_project.write(
        cases(
            f"""

    @pytest.mark.vram_budget(gb=1)
    def test_bad(vram):
        vram.measure(alone, ranks={ranks})
"""
        )
    )
    result = vram_project.run()
    result.assert_outcomes(failed=1)
    assert f"vram.measure: {message}" in output(result)
