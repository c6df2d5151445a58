"""The fake meter: the host meter's ledger over torch's FakeTensorMode.

Tensors have shapes, dtypes and storages of the right size but no data, so a real 7B or 32B
config is traced in seconds with every parameter, gradient, optimizer state and activation
counted as the host meter would count it on a machine large enough to run it.

Not yet a ``--vram-device`` choice (the fake-meter issue): peft's adapter layers call
``Module.to()``, which swaps parameters under FakeTensorMode and fails ("Couldn't swap
Linear.weight"); bitsandbytes 8-bit state and Qwen2-VL read tensor values
(``aten._local_scalar_dense``); and transformers cannot prove a batch unpadded from fake data,
so it materialises an attention mask the real run skips (+320 KiB on tiny-llama b2 s64
whenever the peak falls in the forward pass).
"""

from __future__ import annotations

from typing import final

from torch._subclasses.fake_tensor import FakeTensorMode

from pytest_vram.meters.base import Roles, StepMeasure
from pytest_vram.meters.host import HostMeter

__all__ = ["FakeMeter"]


@final
class FakeMeter:
    name = "fake"
    device = "cpu"  # fake tensors say cpu; none of them holds memory

    def __init__(self) -> None:
        self._host = HostMeter()
        self._fake = FakeTensorMode()

    @property
    def ledger(self):  # type: ignore[no-untyped-def]
        return self._host.ledger

    def fingerprint(self) -> str:
        return "fake"

    def __enter__(self) -> FakeMeter:
        # The fake mode sits below the ledger: the ledger sees each op, then fake runs it.
        self._fake.__enter__()
        self._host.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._host.__exit__(*exc)
        self._fake.__exit__(None, None, None)

    def step_begin(self) -> None:
        self._host.step_begin()

    def step_end(self, roles: Roles) -> StepMeasure:
        return self._host.step_end(roles)
