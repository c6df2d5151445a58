"""What a rank's failure says first: the first line of the exception it ended with."""

from __future__ import annotations

import traceback

from pytest_vram import ranks


def test_a_ranks_failure_starts_with_the_first_line_of_its_exception() -> None:
    # transformers lists DeepSpeed config mismatches one per line after its first line.
    try:
        raise ValueError(
            "Please correct the following DeepSpeed config values that mismatch "
            "TrainingArguments values:\n- ds bf16.enabled=maybe vs hf bf16=True"
        )
    except ValueError:
        payload = traceback.format_exc()
    error = ranks.rank_error(1, 2, "error", payload)
    assert str(error).splitlines()[0] == (
        "rank 1 of 2 failed: ValueError: Please correct the following DeepSpeed config values "
        "that mismatch TrainingArguments values:"
    )
    assert str(error).splitlines()[1] == "Traceback (most recent call last):"


def test_the_exception_line_of_odd_payloads() -> None:
    assert ranks.exception_line("") == ""
    assert ranks.exception_line("MemoryError") == "MemoryError"
    chained = (
        "Traceback (most recent call last):\n"
        '  File "a.py", line 1, in f\n'
        "    g()\n"
        "KeyError: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "a.py", line 3, in f\n'
        "    raise RuntimeError('outer')\n"
        "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "RuntimeError: outer\n"
    )
    assert ranks.exception_line(chained) == "RuntimeError: outer"
