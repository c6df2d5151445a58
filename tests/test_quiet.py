"""``pytest_vram.quiet``: libraries' import chatter stays out of a case's output; the user's own
warnings and log lines stay in it. (``pytest-vram estimate``'s stderr: tests/test_estimate.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pytest_vram import quiet

BITSANDBYTES = "Failed to load CPU gemm_4bit_forward from kernels-community"
# With `kernels` installed (transformers 5.25 requires it), bitsandbytes asks it for that kernel
# from the Hub, offline in a case.
KERNELS = "Skipping publisher trust check for 'kernels-community/"

# A case child as the worker runs one, in a process that has not imported the libraries yet (as
# a cuda server's child, which imports peft and bitsandbytes after the fork): the user's step
# warns, logs and fails.
CHILD = """
import logging, multiprocessing, sys, warnings

from pytest_vram.worker import Job, _child

def step():
    warnings.warn("the user's own warning")
    logging.getLogger("users.code").warning("the user's own log line")
    raise RuntimeError("the user's step failed")

recv, send = multiprocessing.Pipe(duplex=False)
_child(Job(meter="host", fn=step), send, sys.argv[1])
kind, what, _ = recv.recv()
sys.exit(0 if (kind, what) == ("error", "RuntimeError: the user's step failed") else 3)
"""


def test_a_failing_case_output_tail_has_the_users_lines_not_the_libraries(
    tmp_path: Path,
) -> None:
    from pytest_vram.worker import _tail  # what a failing case prints as its output's tail

    output = tmp_path / "case.log"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(output)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, (run.stdout, run.stderr, output.read_text())
    tail = _tail(str(output))
    assert "UserWarning: the user's own warning" in tail
    assert "the user's own log line" in tail
    assert BITSANDBYTES not in output.read_text()
    assert KERNELS not in output.read_text()


def test_only_the_named_messages_of_the_named_loggers_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    for name, start in quiet.LOGGED:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning("%s: the rest of it", start)
            logger.warning("another warning of %s", name)
    assert [r.getMessage() for r in caplog.records] == [
        f"another warning of {name}" for name, _ in quiet.LOGGED
    ]


def test_the_commands_warning_filter_is_scoped_to_the_library_module() -> None:
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install(command=True)
        library = "transformers.modeling_utils"  # the module transformers warns from
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module=library)
        warnings.warn(message, FutureWarning, stacklevel=1)  # this module: the user's own
    assert [str(w.message) for w in caught] == [message]
