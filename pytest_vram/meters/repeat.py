"""The fake meter's later training steps, replayed from the first step's forward and backward.

On fake tensors every operator is a Python dispatch, and the forward and backward are most of
them. From the second step on they are the first step's again (the same operators on the same
shapes; the optimizer state only sits beside them), so each later step replays the first step's
forward-and-backward events with new storage ids, then runs the real optimizer step on
gradients adopted into the replayed gradient storages. The first step must prove that its range
stands alone, or the step runs as traced:

* every storage the range frees, the range allocated (nothing older is released or resized);
* at the next step's start every storage the range allocated is gone, released after the step
  by ``zero_grad`` and the loop dropping its loss and inputs (nothing kept for later: no lazily
  built buffer or cache);
* no host memory (offloaded state) was involved;
* the optimizer's backward is plain ``loss.backward()`` (``Optimizer.repeats_backward``), so
  ``run_step`` calls it and then ``optimizer.step()``, and marks the range's end between them.

The host meter runs every step; tests hold the fake meter to it byte for byte.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final, final

import torch

from pytest_vram.meters.events import ALLOC, FREE
from pytest_vram.timeline import Phase

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pytest_vram.meters.host import HostMeter

__all__ = ["StepReplay"]

_TEMPLATE_STEP: Final = 1


@final
@dataclasses.dataclass(frozen=True)
class _Grad:
    """A gradient at the end of the first step: where it goes, and its storage there."""

    param: torch.Tensor
    sid: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@final
class StepReplay:
    """Records the first step's range through the meter's phases, and replays it."""

    def __init__(self, host: HostMeter) -> None:
        self._host = host
        self._start: tuple[int, int] | None = None  # (event index, operator) at step 1's forward
        self._end: tuple[int, int] | None = None  # ... at the end of its backward
        self._window = 0  # first event after step 1's step_end
        self._window_end: int | None = None  # first event of step 2
        self._grads: tuple[_Grad, ...] = ()
        self._noted: dict[str, set[int]] = {}
        self._sids: dict[int, int] = {}  # step 1's storage id -> the replayed step's
        self._refused = False
        self.replayed = 0  # steps replayed so far

    def phase(self, name: str, step: int) -> None:
        if step != _TEMPLATE_STEP:
            return
        events = self._host.ledger.events
        if name == "forward" and self._start is None:
            self._start = (len(events), events.ops)

    def backward_end(self, step: int) -> None:
        """The first step's range ends here, before ``optimizer.step()`` dispatches anything."""
        events = self._host.ledger.events
        if step == _TEMPLATE_STEP and self._end is None:
            self._end = (len(events), events.ops)

    def first_step_end(self, params: Sequence[torch.Tensor]) -> None:
        """After step 1's ``step_end``, before its ``zero_grad``: the gradients to adopt."""
        ledger = self._host.ledger
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            sid = ledger.track(g)
            if sid is None:
                self._refused = True
                return
            grads.append(_Grad(p, sid, tuple(g.size()), tuple(g.stride()), g.dtype))
        self._grads = tuple(grads)
        self._noted = {role: set(sids) for role, sids in self._host.noted.items()}
        self._window = len(ledger.events)

    def replay(self, step: int) -> bool:
        """At a later step's start: its forward and backward, replayed, with the gradients
        adopted; False (nothing done) where the first step does not prove it repeatable."""
        if self._refused or self._start is None or self._end is None or not self._window:
            return False
        ledger = self._host.ledger
        events = ledger.events
        (first, first_op), (end, end_op) = self._start, self._end
        if self._window_end is None:
            self._window_end = len(events)
        made = {events.sid[i] for i in range(first, end) if events.kind[i] == ALLOC}
        if (
            ledger.host_bytes
            or ledger.host_peak_bytes
            or any(events.sid[i] not in made for i in range(first, end) if events.kind[i] == FREE)
            or any(ledger.is_live(sid) for sid in made)
            or any(g.sid not in made for g in self._grads)
            # The optimizer step frees nothing the forward or backward made.
            or any(
                events.sid[i] in made for i in range(end, self._window) if events.kind[i] == FREE
            )
        ):
            self._refused = True
            return False
        shift = events.ops - first_op
        sids: dict[int, int] = {}
        for i in range(first, end):
            op = events.op[i] + shift
            old = events.sid[i]
            if events.kind[i] == ALLOC:
                sids[old] = ledger.replay_alloc(i, op, sids.get(old))
            else:
                ledger.replay_free(i, sids[old], op)
        events.ops = end_op + shift
        events.phases.extend(
            Phase(p.start + shift, p.name, step)
            for p in events.phases
            if p.step == _TEMPLATE_STEP and first_op < p.start <= end_op
        )
        self._sids = sids
        for role, noted in self._noted.items():
            self._host.noted.setdefault(role, set()).update(sids[s] for s in noted if s in sids)
        with self._host.paused():
            for g in self._grads:
                grad = torch.empty_strided(g.size, g.stride, dtype=g.dtype, device=g.param.device)
                ledger.adopt(grad, sids[g.sid])
                g.param.grad = grad
        self.replayed += 1
        return True

    def release(self) -> None:
        """After the replayed step's ``zero_grad``: free what the first step freed once its
        gradients were gone (its loss and inputs), in the same order."""
        ledger = self._host.ledger
        events = ledger.events
        grads = {g.sid for g in self._grads}
        assert self._window_end is not None  # replay set it
        for i in range(self._window, self._window_end):
            old = events.sid[i]
            if events.kind[i] == FREE and old not in grads and old in self._sids:
                ledger.replay_free(i, self._sids[old], events.ops)
        self._sids = {}
