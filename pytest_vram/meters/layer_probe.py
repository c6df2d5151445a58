"""The probe of a decoder layer (``meters.layers``): its events, traced into a scratch ledger.

The layer runs forward on fresh copies of the tensors it was called with, then backward from a
fresh output gradient, with its parameters' gradient hooks (tensor and accumulate hooks) set
aside. The copies and the gradient are fresh storages held by the probe's graph alone, as the
real graph holds a layer's input and gradient, so their frees fall where the real run's do;
what the graph still holds after the forward (the input, checkpointing's rotary tables) is what
a replay must hold.

The probe proves that the layer stands alone, or ``Refused`` is raised: the forward frees only
what it made; the backward frees only what the layer made, the output gradient and the inputs
the graph held; after the backward only the output, the input gradient and the parameters'
gradients are left, each a whole storage a replay can adopt.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, final

import torch

from pytest_vram.meters.events import ALLOC, EventLog
from pytest_vram.meters.host import StorageLedger

if TYPE_CHECKING:
    from pytest_vram.meters.host import HostMeter

__all__ = ["Refused", "Template", "flatten", "probe", "whole"]


class Refused(Exception):
    """The probe does not prove the layer repeatable."""


def whole(t: object) -> bool:
    """A tensor that is its whole storage: it can be remade and adopted."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


@final
@dataclasses.dataclass
class Template:
    """A probe's events, by storage ids of its scratch log."""

    log: EventLog
    forward: range
    backward: range
    forward_ops: int  # operators the forward dispatched
    backward_ops: int
    op_base: tuple[int, int]  # the log's operator count at each range's start
    out: tuple[int, torch.Size, tuple[int, ...], torch.dtype]  # sid, size, stride, dtype
    # The probe's fresh copy of each tensor the call was given (``_flatten``'s order; the
    # layer's input first), and which of them its graph held: the backward frees those.
    input_sids: list[int]
    held: list[bool]
    grad_out_sid: int
    grad_in: tuple[int, torch.Size, tuple[int, ...], torch.dtype] | None
    # Event index -> (parameter index, sid, arrived, accumulated): the gradient AccumulateGrad
    # set there, and the operator counts where it arrived (its tensor hooks run from there) and
    # where it was set (its accumulate hooks run from there).
    grads: dict[int, list[tuple[int, int, int, int]]]


def probe(
    host: HostMeter,
    anchor: torch.Tensor,
    layer: torch.nn.Module,
    run: Callable[..., Any],
    args: Any,
    kwargs: Any,
) -> Template:
    """Trace ``layer`` called as ``run(*args, **kwargs)`` into a scratch ledger, forward and
    backward, on fresh copies of its tensors; raise ``Refused`` where it does not stand alone.
    ``anchor``: a leaf of no bytes that gives the probe's input a grad_fn of its own."""
    scratch = StorageLedger(EventLog(frames=host.ledger.events.frames))
    scratch.outside = host.ledger.known()
    params = [p for p in layer.parameters() if p.requires_grad]
    # Set aside: a tensor hook (LOMO's fused update) and an accumulate hook act on the whole
    # model, not on the probe; a replay runs them live where the probe set each gradient.
    hooks = [(p._backward_hooks, p._post_accumulate_grad_hooks) for p in params]
    grads: dict[int, list[tuple[int, int, int, int]]] = {}
    arrived: dict[int, int] = {}
    grad_in: list[torch.Tensor] = []
    marks: dict[str, int] = {}
    log = scratch.events
    try:
        with host.recording_into(scratch):
            for i, p in enumerate(params):
                p._backward_hooks = None
                p._post_accumulate_grad_hooks = None  # type: ignore[assignment]
                p.register_hook(functools.partial(_arrived, scratch.events, arrived, i))
                p.register_post_accumulate_grad_hook(_Record(scratch, grads, arrived, i))
            box = _Box(host, scratch, marks, grad_in)
            given = flatten(args, kwargs)
            if len({t.untyped_storage()._cdata for t in given}) != len(given) or any(
                t.requires_grad for t in given[1:]
            ):
                raise Refused  # shared storages, or gradients besides the input's
            hidden = given[0]
            meta = (hidden.size(), hidden.stride(), hidden.dtype)
            x = _Fresh.apply(anchor, meta, box) if hidden.requires_grad else box.fresh(hidden)
            copies = [x, *(box.fresh(t) for t in given[1:])]
            input_sids = [scratch.track(c) for c in copies]
            pargs, pkwargs = _rebuild(args, kwargs, iter(copies))
            del x, copies
            start, op_start = len(log), log.ops
            out = run(*pargs, **pkwargs)
            forward = range(start, len(log))
            forward_ops = log.ops - op_start
            del pargs, pkwargs
            if not whole(out) or None in input_sids:
                raise Refused
            out_sid = scratch.track(out)
            held = [sid is not None and scratch.is_live(sid) for sid in input_sids]
            backward = range(0)
            if out.requires_grad:
                seed = box.make((), (), out.dtype)
                torch.autograd.backward(_Sink.apply(out, box), seed)
                backward = range(marks["backward"], len(log))
            backward_ops = log.ops - marks.get("backward_ops", log.ops)
            assert out_sid is not None
            template = Template(
                log,
                forward,
                backward,
                forward_ops,
                backward_ops,
                (op_start, marks.get("backward_ops", log.ops)),
                (out_sid, out.size(), out.stride(), out.dtype),
                input_sids,  # type: ignore[arg-type]  # no None: checked above
                held,
                marks.get("grad_out", -1),
                None,
                grads,
            )
            if grad_in:
                g = grad_in[0]
                sid = scratch.track(g)
                if not whole(g) or sid is None:
                    raise Refused
                template.grad_in = (sid, g.size(), g.stride(), g.dtype)
            _check(template, scratch, marks.get("fresh_backward"))
            del out
    finally:
        for p, (tensor_hooks, accumulate_hooks) in zip(params, hooks, strict=True):
            p._backward_hooks = tensor_hooks  # setting it re-registers them with autograd
            p._post_accumulate_grad_hooks = accumulate_hooks
            p.grad = None
        scratch.closed = True
    return template


def _check(t: Template, scratch: StorageLedger, fresh_backward: int | None) -> None:
    """Refuse a probe whose layer does not stand alone (see the module's docstring)."""
    log = t.log
    made: set[int] = set()
    for i in t.forward:
        if log.kind[i] == ALLOC:
            made.add(log.sid[i])
        elif log.sid[i] not in made:
            raise Refused
    outside = {t.grad_out_sid, *t.input_sids}
    freed_outside: list[int] = []
    for i in t.backward:
        sid = log.sid[i]
        if log.kind[i] == ALLOC:
            if fresh_backward is not None and i >= fresh_backward:
                raise Refused  # allocated after the input's gradient left the layer
            made.add(sid)
        elif sid in outside:
            freed_outside.append(sid)
        elif sid not in made:
            raise Refused
    held = [sid for sid, h in zip(t.input_sids, t.held, strict=True) if h]
    if t.backward and sorted(freed_outside) != sorted([t.grad_out_sid, *held]):
        raise Refused
    if not t.backward and held:
        raise Refused
    if any(not t.backward.start < i <= t.backward.stop for i in t.grads):
        raise Refused  # a gradient set outside the backward's events
    kept = {g[1] for gs in t.grads.values() for g in gs}
    if -1 in kept:
        raise Refused
    kept |= {t.out[0]} | ({t.grad_in[0]} if t.grad_in else set())
    if {sid for sid in made if scratch.is_live(sid)} != kept:
        raise Refused


@final
class _Box:
    """The probe's fresh tensors and marks."""

    def __init__(
        self, host: HostMeter, scratch: StorageLedger, marks: dict[str, int], grad_in: list[Any]
    ) -> None:
        self.host, self.scratch, self.marks, self.grad_in = host, scratch, marks, grad_in

    def fresh(self, like: torch.Tensor) -> torch.Tensor:
        return self.make(like.size(), like.stride(), like.dtype)

    def make(self, size: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
        with self.host.paused():
            return torch.empty_strided(size, stride, dtype=dtype)


def _arrived(log: EventLog, arrived: dict[int, int], i: int, _grad: torch.Tensor) -> None:
    """A probe's tensor hook: the operator count where a parameter's gradient arrived."""
    arrived[i] = log.ops


@final
class _Record:
    """A probe's accumulate hook: where each parameter's gradient was set, and to what."""

    def __init__(
        self,
        scratch: StorageLedger,
        grads: dict[int, list[tuple[int, int, int, int]]],
        arrived: dict[int, int],
        i: int,
    ) -> None:
        self.scratch, self.grads, self.arrived, self.i = scratch, grads, arrived, i

    def __call__(self, p: torch.Tensor) -> None:
        g = p.grad
        sid = self.scratch.track(g) if g is not None else None
        if g is None or sid is None or g.size() != p.size() or g.stride() != p.stride():
            sid = -1  # refused by _check
        log = self.scratch.events
        entry = (self.i, sid, self.arrived.pop(self.i, log.ops), log.ops)
        self.grads.setdefault(len(log), []).append(entry)


class _Fresh(torch.autograd.Function):
    """The probe's input: a fresh storage like the layer's input, whose gradient is kept."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, meta: tuple[Any, ...], box: _Box) -> torch.Tensor:
        ctx.box = box
        return box.make(*meta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        box = ctx.box
        box.marks["fresh_backward"] = len(box.scratch.events)
        box.grad_in.append(grad)
        return None, None, None


class _Sink(torch.autograd.Function):
    """The probe's output gradient: a fresh storage, held by autograd alone."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, box: _Box) -> torch.Tensor:
        ctx.box, ctx.meta = box, (out.size(), out.stride(), out.dtype)
        return box.make((), (), out.dtype)

    @staticmethod
    def backward(ctx: Any, _seed: torch.Tensor) -> tuple[torch.Tensor, None]:
        box = ctx.box
        grad = box.make(*ctx.meta)
        sid = box.scratch.track(grad)
        box.marks["grad_out"] = -1 if sid is None else sid
        box.marks["backward"] = len(box.scratch.events)
        box.marks["backward_ops"] = box.scratch.events.ops
        return grad, None


def flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of a call, the layer's input first, in an order each call of one signature
    shares. (No nested function: a recursive closure is a reference cycle, which would keep
    the tensors alive until the garbage collector ran.)"""
    found: list[torch.Tensor] = []
    _walk(args, found)
    for name in sorted(kwargs):
        _walk(kwargs[name], found)
    return found


def _walk(value: Any, found: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _walk(item, found)


def _rebuild(args: tuple[Any, ...], kwargs: dict[str, Any], tensors: Iterator[torch.Tensor]) -> Any:
    """``args`` and ``kwargs`` with their tensors replaced, in ``_flatten``'s order."""
    new_args = _swap(args, tensors)
    return new_args, {name: _swap(kwargs[name], tensors) for name in sorted(kwargs)}


def _swap(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, (tuple, list)):
        return type(value)(_swap(item, tensors) for item in value)
    return value
