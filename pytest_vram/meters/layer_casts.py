"""A decoder layer whose first call casts its own parameters, replayed with the casts.

bitsandbytes' ``Linear4bit`` casts its bias to the input's dtype at its first call
(``bias.data = bias.data.to(x.dtype)``): in the first step every layer of a QLoRA model with
biases (Qwen2's q, k and v projections) changes itself, so no probe of the layer as it was can
stand for the others (``meters.layers``). Such a first call is the layer's steady call with
the casts spliced in. ``first_call`` proves it: the casts are the only change to the layer
(parameters of the same shape and layout in another dtype, each one allocation of the new
storage followed at once by the free of the old), and the call's other events are the steady
probe's forward event for event, each later by the operators the casts before it dispatched.
A replay of that template makes each cast where the first call made it: the new storage
allocated and the old one freed in the ledger, the parameter's data replaced by a tensor
adopted as the new storage. Its backward is the steady probe's: each cast comes before the
parameter's first use, so the call's graph holds only what the steady call's does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, final

import torch

from pytest_vram.meters.events import ALLOC, FREE, EventLog
from pytest_vram.meters.layer_probe import Refused, Template, whole

if TYPE_CHECKING:
    from pytest_vram.meters.host import HostMeter, StorageLedger

__all__ = ["Cast", "FirstCall", "cast_parameters", "first_call", "make_cast", "parameter_sids"]


@final
@dataclasses.dataclass(frozen=True)
class Cast:
    """One parameter cast by a layer's first call."""

    path: str  # the parameter's name in the layer ("self_attn.q_proj.base_layer.bias")
    dtype: torch.dtype
    before: int  # the place among the steady forward's events where it comes
    log: EventLog  # the log of the first call, with its events (their stacks)
    alloc: int  # index of the new storage's allocation in ``log``; the old one's free follows
    alloc_op: int  # operator counts from the call's start
    free_op: int


@final
@dataclasses.dataclass(frozen=True)
class FirstCall:
    """A layer's first call: its steady template with the casts it makes."""

    steady: Template
    casts: tuple[Cast, ...]
    cast_ops: int  # operators one cast dispatches


def parameter_sids(layer: torch.nn.Module, ledger: StorageLedger) -> dict[str, int]:
    """The ledger's id of each parameter's storage, without registering any (a registration
    would log an allocation the traced run does not have)."""
    known = ledger.known()
    sids = {}
    for name, p in layer.named_parameters():
        sid = known.get(p.untyped_storage()._cdata)
        if sid is not None:
            sids[name] = sid
    return sids


def cast_parameters(key: Any, after: Any) -> list[tuple[str, torch.dtype]]:
    """The parameters a call changed from signature ``key`` to ``after`` (``layers._signature``),
    each to its new dtype; ``Refused`` for any other change. Checked before the layer is probed:
    a probe of a layer that goes on changing itself would change it outside the ledger."""
    if key[:5] != after[:5] or len(key[5]) != len(after[5]):
        raise Refused
    found = []
    for (name, cls, settings, tensors), (name2, cls2, settings2, tensors2) in zip(
        key[5], after[5], strict=True
    ):
        if (name, cls, settings, len(tensors)) != (name2, cls2, settings2, len(tensors2)):
            raise Refused
        for old, new in zip(tensors, tensors2, strict=True):
            if old == new:
                continue
            # A buffer's entry is (name, key); a parameter's also has the parameter's class.
            if len(old) != 3 or old[:2] != new[:2]:
                raise Refused
            size, stride, offset, _, grad, _ = old[2]
            size2, stride2, offset2, dtype, grad2, _ = new[2]
            if (size, stride, offset, grad) != (size2, stride2, offset2, grad2):
                raise Refused
            found.append((f"{name}.{old[0]}" if name else old[0], dtype))
    if not found:
        raise Refused
    return found


def first_call(
    steady: Template,
    casts: list[tuple[str, torch.dtype]],
    layer: torch.nn.Module,
    ledger: StorageLedger,
    before: dict[str, int],
    events: range,
    ops: range,
) -> FirstCall:
    """The template of a first call that made ``casts`` (``cast_parameters``), whose events
    were ``events`` of ``ledger``'s log and operators ``ops``; ``before``: the layer's
    parameters' storages before it (``parameter_sids``). ``Refused`` unless the call was the
    steady one with the casts."""
    log = ledger.events
    known = ledger.known()
    found: list[tuple[str, torch.dtype, int]] = []
    for path, dtype in casts:
        p = layer.get_parameter(path)
        old, new = before.get(path), known.get(p.untyped_storage()._cdata)
        alloc = next((i for i in events if log.sid[i] == new and log.kind[i] == ALLOC), None)
        if old is None or alloc is None or alloc + 1 not in events or not whole(p):
            raise Refused  # the new storage must be one a replay can make and adopt
        if (log.kind[alloc + 1], log.sid[alloc + 1]) != (FREE, old):
            raise Refused
        found.append((path, dtype, alloc))
    found.sort(key=lambda c: c[2])
    cast_events = {i for *_, alloc in found for i in (alloc, alloc + 1)}
    rest = [i for i in events if i not in cast_events]
    extra = len(ops) - steady.forward_ops
    if len(rest) != len(steady.forward) or extra % len(found):
        raise Refused
    cast_ops = extra // len(found)
    starts = [alloc for *_, alloc in found]
    t = steady.log
    sids: dict[int, int] = {}
    done = 0  # casts before the event
    for i, j in zip(rest, steady.forward, strict=True):
        while done < len(starts) and starts[done] < i:
            done += 1
        if (log.kind[i], log.nbytes[i]) != (t.kind[j], t.nbytes[j]):
            raise Refused
        if log.op[i] - ops.start != t.op[j] - steady.op_base[0] + done * cast_ops:
            raise Refused
        if sids.setdefault(log.sid[i], t.sid[j]) != t.sid[j]:
            raise Refused
    if len(set(sids.values())) != len(sids):
        raise Refused
    made = tuple(
        Cast(
            path,
            dtype,
            sum(i < alloc for i in rest),
            log,
            alloc,
            log.op[alloc] - ops.start,
            log.op[alloc + 1] - ops.start,
        )
        for path, dtype, alloc in found
    )
    return FirstCall(steady, made, cast_ops)


def make_cast(host: HostMeter, p: torch.Tensor, cast: Cast, start: int) -> None:
    """``cast`` made on ``p`` in a replay that began at operator ``start``, as the first call
    made it: the new storage, then the old one freed, the parameter holding the new one."""
    ledger = host.ledger
    old = ledger.track(p)
    assert old is not None  # a meta parameter: no layer of a fake or host model has one
    new = ledger.replay_alloc(cast.alloc, start + cast.alloc_op, None, cast.log)
    ledger.replay_free(cast.alloc + 1, old, start + cast.free_op, cast.log)
    with host.paused():
        p.data = torch.empty_strided(p.size(), p.stride(), dtype=cast.dtype)
    ledger.adopt(p, new)
