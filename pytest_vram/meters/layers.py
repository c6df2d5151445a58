"""The fake meter's repeated decoder layers, replayed from one traced layer of the same kind.

A real-size model's operators are mostly those of its decoder layers, all alike: Qwen2.5-32B
runs 64. On fake tensors every operator is a Python dispatch, so each kind of layer is traced
once and the others replay its events into the ledger instead of dispatching anything.

The first call of each kind (``_signature``: the layer's class and settings, its parameters',
buffers' and inputs' metadata, the grad and autocast modes) runs as usual, and before it a
probe runs the same layer into a scratch ledger: forward on a fresh input, then backward from a
fresh output gradient, with the parameters' gradient hooks set aside. The probe's input and
output gradient are fresh storages so that the probe's graph alone holds them, as the real
graph holds a layer's input and gradient: their frees fall where the real run's do. Each later
call of that kind replays the probe's forward events (with new storage ids) and returns a
tensor adopted as the output's storage; autograd reaches it through a ``Function`` whose
backward replays the probe's backward events, hands each parameter its gradient where
AccumulateGrad did in the probe (running the parameter's tensor and accumulate hooks then, live:
LOMO's fused update is such a hook), and returns the input gradient. A storage a real tensor
still holds (the input, the output gradient) is released in the ledger at the probe's point.

A first call that casts the layer's own parameters (bitsandbytes' Linear4bit casts its bias to
the input's dtype) is probed as it left the layer, and its kind is replayed with the casts
spliced in where the first call made them (``meters.layer_casts``).

The probe must prove that the layer stands alone, or its kind runs as traced: the forward frees
only what it made; the backward frees only what the layer made, its input and its output
gradient; after the backward only the output, the input gradient and the parameters' gradients
are left; no hooks on the layer's modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, final

import torch

from pytest_vram.meters.events import ALLOC, EventLog
from pytest_vram.meters.layer_casts import (
    FirstCall,
    cast_parameters,
    first_call,
    make_cast,
    parameter_sids,
)
from pytest_vram.meters.layer_probe import Refused, Template, flatten, probe

if TYPE_CHECKING:
    from pytest_vram.meters.host import HostMeter

__all__ = ["LayerReplay", "repeated_layers"]

# A stack of fewer layers is traced whole: its first layer of each kind is traced anyway.
MIN_LAYERS: Final = 4
_PRIMITIVE: Final = (bool, int, float, str, type(None))
# Module's own attributes (hooks, parameter dicts): not settings.
_MODULE_ATTRIBUTES: Final = frozenset(vars(torch.nn.Module()))


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ``ModuleList`` of modules of one class: the decoder layers."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > max(len(best), 1):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best if len(best) >= MIN_LAYERS else []


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (
        tuple(t.shape),
        t.stride(),
        t.storage_offset(),
        t.dtype,
        t.requires_grad,
        t.untyped_storage().nbytes(),
    )


def _value_key(value: Any) -> Any:
    """A hashable key of an argument, or raise TypeError for one the probe cannot copy."""
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, _PRIMITIVE):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_value_key(v) for v in value)
    raise TypeError(type(value).__name__)


def _settings(module: torch.nn.Module, index: str) -> tuple[Any, ...]:
    """A module's own attributes: plain settings by value, without its layer's index
    (``layer_idx``, or peft's ``target_name`` "model.layers.7.mlp.up_proj"; ``index`` is ".7."
    for the eighth layer), tensors by metadata, anything else by name (one set on a first call
    changes the module)."""
    items: list[tuple[str, Any]] = []
    for name, value in vars(module).items():
        if name in _MODULE_ATTRIBUTES or name == "layer_idx":
            continue
        if isinstance(value, torch.Tensor):
            items.append((name, _tensor_key(value)))
        elif isinstance(value, (*_PRIMITIVE, dict, tuple, list)):
            items.append((name, repr(value).replace(index, ".#.")))
        else:
            items.append((name, None))
    return tuple(items)


def _hooked(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _signature(
    layer: torch.nn.Module, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """What makes two calls trace the same events; None for a call that cannot be replayed.
    ``index``: the layer's place in its stack."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    try:
        inputs = (_value_key(args), tuple(sorted((k, _value_key(v)) for k, v in kwargs.items())))
    except TypeError:  # a cache object, say: state outside the layer
        return None
    modules: list[Any] = []
    for name, module in layer.named_modules():
        if _hooked(module):
            return None
        tensors: list[tuple[Any, ...]] = []
        for pname, p in module.named_parameters(recurse=False):
            if p.grad is not None:
                return None
            tensors.append((pname, type(p), _tensor_key(p)))
        for bname, b in module.named_buffers(recurse=False):
            tensors.append((bname, _tensor_key(b)))
        modules.append((name, type(module), _settings(module, f".{index}."), tuple(tensors)))
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    return (type(layer), layer.training, torch.is_grad_enabled(), autocast, inputs, tuple(modules))


_REFUSED: Final = object()


@final
class LayerReplay:
    """Installs itself on a model's decoder layers; ``restore`` undoes it."""

    def __init__(self, host: HostMeter) -> None:
        self._host = host
        self._templates: dict[Any, Template | object] = {}
        self._restore: list[Callable[[], None]] = []
        self._index: dict[int, int] = {}  # id(layer) -> its place in the stack
        self.replayed = 0  # layer calls replayed
        with host.paused():
            # Gives every replayed layer's output a grad_fn when its input has none (frozen
            # embeddings, LoRA's first layer): a leaf of no bytes.
            self._anchor = torch.empty(0, requires_grad=True)

    def install(self, model: torch.nn.Module) -> None:
        classes: dict[type[torch.nn.Module], type[torch.nn.Module]] = {}
        for index, layer in enumerate(repeated_layers(model)):
            self._index[id(layer)] = index
            cls = type(layer)
            if cls not in classes:
                classes[cls] = _replaying(cls, self)
            layer.__class__ = classes[cls]
            self._restore.append(functools.partial(setattr, layer, "__class__", cls))

    def restore(self) -> None:
        while self._restore:
            self._restore.pop()()

    def call(self, layer: torch.nn.Module, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        index = self._index[id(layer)]
        key = _signature(layer, index, args, kwargs)
        if key is None:
            return run(*args, **kwargs)
        template = self._templates.get(key)
        if template is None:
            # The call first: what it converts or builds once (fake copies of a library's
            # module-level tensors) is then the real ledger's, not the probe's.
            log = self._host.ledger.events
            before = parameter_sids(layer, self._host.ledger)
            start, op_start = len(log), log.ops
            out = run(*args, **kwargs)
            calls = (layer, index, run, args, kwargs)
            made = (before, range(start, len(log)), range(op_start, log.ops))
            self._templates[key] = self._template(key, calls, made)
            return out
        if template is _REFUSED:
            return run(*args, **kwargs)
        self.replayed += 1
        first = template if isinstance(template, FirstCall) else None
        t = template.steady if isinstance(template, FirstCall) else template
        assert isinstance(t, Template)  # _REFUSED is the only other value
        params = [p for p in layer.parameters() if p.requires_grad]
        if t.backward:
            held = [x if h else None for x, h in zip(flatten(args, kwargs), t.held, strict=True)]
            return _Replayed.apply(self, t, params, held, (layer, first), self._anchor, args[0])
        return self._forward(t, layer, first)[0]

    def _template(
        self, key: Any, calls: tuple[Any, ...], made: tuple[dict[str, int], range, range]
    ) -> Template | FirstCall | object:
        """The template of signature ``key``, after its first call: a probe of the layer, or,
        for a call that cast the layer's parameters (bitsandbytes' Linear4bit casts its bias),
        a probe of the layer as the call left it, with the casts (``meters.layer_casts``)."""
        layer, index, run, args, kwargs = calls
        after = _signature(layer, index, args, kwargs)
        try:
            if after == key:
                return probe(self._host, self._anchor, layer, run, args, kwargs)
            casts = cast_parameters(key, after)
            steady = self._templates.get(after)
            if steady is None:
                self._templates[after] = _REFUSED  # unless the probe below proves the kind
                steady = probe(self._host, self._anchor, layer, run, args, kwargs)
                if _signature(layer, index, args, kwargs) != after:
                    raise Refused  # the probe's call changed the layer again
                self._templates[after] = steady
            if not isinstance(steady, Template):
                return _REFUSED
            return first_call(steady, casts, layer, self._host.ledger, *made)
        except Refused:
            return _REFUSED

    # The probe.

    # The replay.

    def _forward(
        self, t: Template, layer: torch.nn.Module, first: FirstCall | None
    ) -> tuple[torch.Tensor, dict[int, int]]:
        ledger = self._host.ledger
        sids: dict[int, int] = {}
        base = ledger.events.ops - t.op_base[0]
        start = ledger.events.ops
        casts, cast_ops = (first.casts, first.cast_ops) if first is not None else ((), 0)
        done = 0  # casts made
        for place, i in enumerate(t.forward):
            while done < len(casts) and casts[done].before == place:
                make_cast(self._host, layer.get_parameter(casts[done].path), casts[done], start)
                done += 1
            self._event(t.log, i, base + done * cast_ops, sids)
        for cast in casts[done:]:
            make_cast(self._host, layer.get_parameter(cast.path), cast, start)
        ledger.events.ops = start + t.forward_ops + len(casts) * cast_ops
        sid, size, stride, dtype = t.out
        with self._host.paused():
            out = torch.empty_strided(size, stride, dtype=dtype)
        ledger.adopt(out, sids[sid])
        return out, sids

    def _event(self, log: EventLog, i: int, base: int, sids: dict[int, int]) -> None:
        ledger = self._host.ledger
        old = log.sid[i]
        # The operator count follows the replay: a real tensor freed along the way (a held
        # input let go, a gradient a hook drops) is logged at the probe's operator.
        op = ledger.events.ops = base + log.op[i]
        if log.kind[i] == ALLOC:
            sids[old] = ledger.replay_alloc(i, op, sids.get(old), log)
        else:
            ledger.replay_free(i, sids[old], op, log)

    def _backward(
        self,
        t: Template,
        sids: dict[int, int],
        params: list[torch.Tensor],
        held: list[torch.Tensor | None],
    ) -> torch.Tensor | None:
        ledger = self._host.ledger
        start = ledger.events.ops
        base = start - t.op_base[1]
        inputs = {sid: k for k, sid in enumerate(t.input_sids)}
        log = t.log
        for i in t.backward:
            k = inputs.get(log.sid[i])
            if k is not None:
                ledger.events.ops = base + log.op[i]
                held[k] = None  # freed as the probe's copy was, unless held elsewhere too
            else:
                self._event(log, i, base, sids)
            for index, sid, arrived, accumulated in t.grads.get(i + 1, ()):
                p = params[index]
                with self._host.paused():
                    grad = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype)
                ledger.adopt(grad, sids[sid])
                # As AccumulateGrad runs them, each from the probe's operator count plus what
                # the hooks before ran live: the tensor hooks on the arriving gradient (LOMO
                # updates and drops the previous parameter's here), then the accumulate hooks.
                ops = ledger.events.ops = base + arrived
                for hook in tuple((p._backward_hooks or {}).values()):
                    changed = hook(grad)
                    grad = grad if changed is None else changed
                    del changed  # a reference kept here would outlive the parameter's .grad
                base += ledger.events.ops - ops
                p.grad = grad
                del grad
                ops = ledger.events.ops = base + accumulated
                for hook in tuple((p._post_accumulate_grad_hooks or {}).values()):
                    hook(p)
                base += ledger.events.ops - ops
        ledger.events.ops = base + t.op_base[1] + t.backward_ops
        if t.grad_in is None:
            return None
        sid, size, stride, dtype = t.grad_in
        with self._host.paused():
            grad_in = torch.empty_strided(size, stride, dtype=dtype)
        ledger.adopt(grad_in, sids[sid])
        return grad_in


class _Replayed(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        replay: LayerReplay,
        t: Template,
        params: list[torch.Tensor],
        held: list[torch.Tensor | None],
        first: tuple[torch.nn.Module, FirstCall | None],
        anchor: torch.Tensor,
        hidden: torch.Tensor,
    ) -> torch.Tensor:
        out, sids = replay._forward(t, *first)
        # What the probe's graph held (the input, checkpointing's rotary tables) is held here
        # until the backward frees it where the probe's did.
        ctx.replay, ctx.t, ctx.params, ctx.sids, ctx.held = replay, t, params, sids, held
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        replay: LayerReplay = ctx.replay
        sid = replay._host.ledger.track(grad_out)
        if sid is not None:
            ctx.sids[ctx.t.grad_out_sid] = sid
        grad_in = replay._backward(ctx.t, ctx.sids, ctx.params, ctx.held)
        ctx.held = None
        return None, None, None, None, None, None, grad_in


def _replaying(cls: type[torch.nn.Module], replay: LayerReplay) -> type[torch.nn.Module]:
    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # The class's own __call__ (GradientCheckpointingLayer's, or Module's), as super() would.
        return replay.call(self, functools.partial(cls.__call__, self), args, kwargs)

    replaying = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return replaying
