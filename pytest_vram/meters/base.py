"""What a meter is: the protocol every meter implements, and the tensors it is shown.

Nothing here imports torch; the meters themselves do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from pytest_vram.result import StepMeasure

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = ["Meter", "Roles"]


@dataclasses.dataclass
class Roles:
    """The tensors that hold model state at the end of a step, for the breakdown."""

    params: Sequence[torch.Tensor]
    buffers: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    optimizer: Sequence[torch.Tensor]


class Meter(Protocol):
    """Reads memory around a step. Host, fake and cuda meters differ only in how they read it."""

    name: str
    device: str  # torch device the step runs on

    def fingerprint(self) -> str: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def step_begin(self) -> None: ...

    def step_end(self, roles: Roles) -> StepMeasure: ...
