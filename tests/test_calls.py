"""The label of a vram.measure call, and how the call travels to the child that runs it."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_vram.calls import MAX_ARGS_CHARS, call_label
from pytest_vram.worker import Job


def one_step(*args: object, **kwargs: object) -> None:
    return None


class Recipe:
    def __init__(self, lr: float) -> None:
        self.lr = lr


NAME = f"{__name__}.one_step"


def label(*args: object, ranks: int | None = None, **kwargs: object) -> str:
    return call_label(one_step, args, kwargs, ranks)


def test_a_call_without_arguments_keeps_the_functions_name() -> None:
    assert label() == NAME
    assert label(ranks=2) == f"{NAME} r2"


def test_arguments_are_written_as_python_writes_plain_data() -> None:
    assert label("recipes/sft.yaml", 2, lr=1e-4) == f"{NAME}('recipes/sft.yaml', 2, lr=0.0001)"
    assert label((1,), [True, None]) == f"{NAME}((1,), [True, None])"
    # dicts and sets in a fixed order, whatever order they were built in
    assert label({"b": 1, "a": 2}) == label({"a": 2, "b": 1}) == f"{NAME}({{'a': 2, 'b': 1}})"
    assert label({3, 1, 2}) == f"{NAME}({{1, 2, 3}})"
    assert label(z=1, a=2) == f"{NAME}(a=2, z=1)"


def test_different_arguments_never_share_a_label() -> None:
    labels = {label("a"), label("b"), label(lr=1), label(lr=1.5), label(1), label("1")}
    assert len(labels) == 6


def test_a_path_under_the_working_directory_is_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert label(tmp_path / "ds" / "z3.json") == f"{NAME}('ds/z3.json')"
    assert label(str(tmp_path / "ds")) == f"{NAME}('ds')"  # a string holding a path too
    assert label("ds/z3.json") == f"{NAME}('ds/z3.json')"  # relative: as given


def test_a_temporary_folder_is_the_same_in_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    # pytest's tmp_path is new in every run: a label holding it would never find its baseline
    assert label(tmp_path / "test_sft0", steps=2) == f"{NAME}('<tmp>', steps=2)"
    assert label(str(tmp_path)) == f"{NAME}('<tmp>')"
    elsewhere = "/opt/models/llama"
    assert label(elsewhere) == f"{NAME}({elsewhere!r})"


def test_an_object_is_named_by_type_and_content_never_by_address() -> None:
    first = label(Recipe(0.1))
    assert first.startswith(f"{NAME}(<Recipe@") and "0x" not in first
    assert label(Recipe(0.1)) == first  # a new object with the same content
    assert label(Recipe(0.2)) != first


def test_a_long_form_is_cut_with_a_digest_of_the_whole() -> None:
    long_a = label("x" * 200 + "a")
    long_b = label("x" * 200 + "b")
    assert long_a != long_b
    inner = long_a.removeprefix(f"{NAME}(").removesuffix(")")
    assert len(inner) == MAX_ARGS_CHARS and "…@" in inner


def test_the_call_travels_pickled_and_is_imported_only_where_it_runs(tmp_path: Path) -> None:
    # A module the pytest process imports, the job's receiver cannot: unpickling the job must
    # not import it (a GPU rank's parent would run its top-level imports before the fork).
    (tmp_path / "user_train.py").write_text("def step(path):\n    return path\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import user_train

        job = Job("host", fn=user_train.step, args=("recipes/a.yaml",), ranks=2)
        sent = pickle.dumps(job)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_train", None)
    code = (
        "import pickle, sys\n"
        "job = pickle.loads(sys.stdin.buffer.read())\n"
        "print(job.label, 'user_train' in sys.modules)\n"
        "try:\n    pickle.loads(job.call)\nexcept ModuleNotFoundError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-c", code], input=sent, capture_output=True, check=True, env=env
    ).stdout.decode()
    assert out.splitlines() == [
        "user_train.step('recipes/a.yaml') r2 False",
        "No module named 'user_train'",
    ]
