"""A method or optimizer is one class that declares what the other modules ask of it.

The registry files an entry by the kind it declares; every built-in declares every fact of its
protocol itself (a forgotten one would read the protocol's default, right only for a stranger);
the defaults refuse nothing a stranger asks for and assume nothing about it; and no module
outside ``pytest_vram/methods/`` names a method or an optimizer.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
from collections.abc import Iterator, Mapping

import pytest

import pytest_vram
from pytest_vram import StepSpec, meters, methods, references
from pytest_vram.errors import SpecError
from pytest_vram.meters import limits
from pytest_vram.methods import LlamaFactoryRow, Method, Optimizer, OptionValue, Trains

BUILT_IN: list[Method | Optimizer] = [*methods.METHODS.values(), *methods.OPTIMIZERS.values()]
PACKAGE = pathlib.Path(pytest_vram.__file__).parent


def protocol_of(entry: Method | Optimizer) -> type:
    return Method if entry.kind == "method" else Optimizer


def undeclared(entry: Method | Optimizer) -> list[str]:
    """The protocol's annotated members that no class of the entry's own sets (the kind is
    the protocol's to set)."""
    mro = type(entry).__mro__
    own = mro[: mro.index(protocol_of(entry))]
    wanted = [name for name in protocol_of(entry).__annotations__ if name != "kind"]
    return [name for name in wanted if not any(name in vars(cls) for cls in own)]


@pytest.fixture
def registry() -> Iterator[None]:
    saved = methods.snapshot()
    yield
    methods.restore(saved)


class Stranger(Method):
    """A user's own method, as the README says to write one: only what differs."""

    name = "stranger"
    options: Mapping[str, OptionValue] = {}


@pytest.mark.parametrize("entry", BUILT_IN, ids=lambda e: f"{e.kind}-{e.name}")
def test_every_built_in_declares_every_fact(entry: Method | Optimizer) -> None:
    assert undeclared(entry) == []


def test_a_forgotten_fact_is_found() -> None:
    class Forgetful(Method):
        name = "forgetful"
        options: Mapping[str, OptionValue] = {}
        trains = Trains.OTHER

    assert undeclared(Forgetful()) == [
        "runs_under_zero",
        "fake_meter_blocker",
        "llama_factory_row",
        "base_weight_bits",
    ]


@pytest.mark.usefixtures("registry")
def test_the_registry_files_entries_by_their_declared_kind() -> None:
    class Declared:  # neither protocol as a base class: only what it declares
        kind = "optimizer"
        name = "declared-only"
        options: Mapping[str, OptionValue] = {}

    methods.register(Declared())  # type: ignore[arg-type]
    assert "declared-only" in methods.OPTIMIZERS and "declared-only" not in methods.METHODS

    class Neither(Declared):
        kind = "scheduler"  # type: ignore[assignment]
        name = "neither"

    with pytest.raises(TypeError, match="declares kind='scheduler'; an entry is a 'method' or"):
        methods.register(Neither())  # type: ignore[arg-type]


@pytest.mark.usefixtures("registry")
def test_the_defaults_refuse_a_stranger_nothing_and_assume_nothing() -> None:
    methods.register(Stranger())
    spec = StepSpec(model="llama-7b", method="stranger")
    assert meters.unsupported("fake", spec) is None
    assert references.llama_factory("stranger", "adamw", "bf16", 7 * 10**9) is None
    with pytest.raises(SpecError, match=r"^zero=2 runs methods full, freeze, lora, qlora; not "):
        StepSpec(model="tiny-llama", method="stranger", zero=2)
    # Optimizers that pick their own parameters do not guess what a stranger trains.
    for optimizer in ("galore-adamw", "badam"):
        with pytest.raises(SpecError, match=f"^stranger with {optimizer}: "):
            StepSpec(model="tiny-llama", method="stranger", optimizer=optimizer)


@pytest.mark.usefixtures("registry")
def test_what_runs_under_zero_is_what_declares_it() -> None:
    class ZeroReady(Stranger):
        name = "zero-ready"
        runs_under_zero = True

    methods.register(ZeroReady())
    assert StepSpec(model="tiny-llama", method="zero-ready", zero=2).zero == 2
    with pytest.raises(SpecError) as info:
        StepSpec(model="tiny-llama", method="dora", zero=2)
    assert (
        str(info.value) == "zero=2 runs methods full, freeze, lora, qlora, zero-ready; not 'dora'"
    )


def test_optimizers_that_run_under_zero_have_a_simulated_layout() -> None:
    for name, optimizer in methods.OPTIMIZERS.items():
        assert (optimizer.zero_state is not None) == optimizer.runs_under_zero, name


def test_quantized_bases_read_the_qlora_rows_by_their_bits() -> None:
    for name, method in methods.METHODS.items():
        quantized = method.llama_factory_row is LlamaFactoryRow.QLORA
        assert quantized == (method.base_weight_bits is not None), name
    for row in LlamaFactoryRow:  # each names the start of a row's Method cell
        assert any(r.method.split(" (")[0] == row.value for r in references.LLAMA_FACTORY)


def test_a_torch_class_takes_the_optimizers_options_as_keywords() -> None:
    import torch

    torch_optimizers = [o for o in methods.OPTIMIZERS.values() if o.torch_class is not None]
    assert torch_optimizers
    for optimizer in torch_optimizers:
        assert optimizer.torch_class is not None
        signature = inspect.signature(getattr(torch.optim, optimizer.torch_class))
        # implementation is torch's foreach / fused, which every torch class takes
        keywords = set(optimizer.options) - {"implementation"} | {"foreach", "fused"}
        assert keywords <= set(signature.parameters), optimizer.name


def test_the_fake_meter_limits_are_torch_free_and_the_meters_own() -> None:
    assert meters.unsupported is limits.unsupported
    spec = StepSpec(model="tiny-llama", method="lora-8bit")
    reason = methods.METHODS["lora-8bit"].fake_meter_blocker
    assert reason and "Int8Params" in reason
    assert (
        limits.unsupported("fake", spec)
        == f"lora-8bit is not supported on the fake meter: {reason}"
    )
    assert limits.unsupported("host", spec) is None


# Strings outside methods/ that equal a registered name without naming the entry.
_NOT_A_LIST: set[tuple[str, str]] = {
    ("spec.py", "full"),  # StepSpec's default method
    ("spec.py", "adamw"),  # StepSpec's default optimizer
    ("preload.py", "badam"),  # the library module the worker preloads
}


def _name_literals() -> Iterator[tuple[str, int, str]]:
    names = set(methods.METHODS) | set(methods.OPTIMIZERS)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names:
                    yield relative.as_posix(), node.lineno, node.value


def test_no_module_outside_methods_names_a_method_or_optimizer() -> None:
    found = [(f, line, v) for f, line, v in _name_literals() if (f, v) not in _NOT_A_LIST]
    assert found == []
