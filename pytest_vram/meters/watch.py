"""The dispatch mode under which a storage ledger sees every op: each storage an op reads or
makes is handed to the ledger, and the fake meter's observers see the op after it ran.

Half-precision matmuls on real CPU tensors run in fp32 and are rounded once to their dtype
(``Watch.fp32_matmul``): the ledger sees the same op make the same output (dtype, size,
strides), and only the arithmetic is another kernel's. CPUs without bf16 or fp16 instructions
(AVX2 ones) run torch's half-precision matmul on a slow reference path: 95% of a tiny-llama
bf16 step's time on one, 7x the step with the fp32 kernel. Where an output element differs, it
is by the last bit, from the order of the fp32 sums."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from pytest_vram.meters.host import StorageLedger

__all__ = ["Inert", "OpObserver", "Watch"]

# Called with (func, args) before an op runs: True where the op need not run at all. Such an op
# is in-place: it returns nothing or its first argument, which it then returns unchanged.
Inert = Callable[[Any, tuple[Any, ...]], bool]

_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_DEVICE = torch.ops.prim.device.default
_aten = torch.ops.aten
_ITEM = _aten._local_scalar_dense.default
_MATMULS: Final = frozenset(
    {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
)
_HALF: Final = frozenset({torch.bfloat16, torch.float16})
_PLAIN: Final = (torch.Tensor, torch.nn.Parameter)  # real tensors: not fake, no subclass


# Called with (func, args, kwargs, out) after each op the ledger sees: the fake meter follows
# position ids through it, without a dispatch mode of its own (each mode costs every op).
OpObserver = Callable[[Any, tuple[Any, ...], dict[str, Any], Any], None]


class Watch(TorchDispatchMode):
    def __init__(self, ledger: StorageLedger) -> None:
        super().__init__()
        self.ledger = ledger
        self.observer: OpObserver | None = None
        self.paused = False  # ops run unseen (tensors the ledger will adopt)
        # Ops that need not run: on fake tensors, those that make and return nothing.
        self.inert: Inert | None = None
        self.fp32_matmul = True  # half-precision CPU matmuls through the fp32 kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is _DEVICE:
            # A fake tensor's device, asked through dispatch (a real one answers in C++; the
            # autograd engine asks for each gradient): no storage is involved.
            device = getattr(args[0], "fake_device", None)
            if device is not None:
                return device
        if self.paused:
            return func(*args, **(kwargs or {}))
        ledger = self.ledger
        ledger.events.ops += 1
        if func is _LIFT_FRESH:
            # torch.tensor(data): the data is the tensor, or under FakeTensorMode its fake copy,
            # and only that copy counts.
            out = func(*args, **(kwargs or {}))
            ledger.track(out)
            return out
        # Inputs too: a tensor made outside any op (from_numpy, unpickled) counts once it is used.
        _walk(args, ledger.seen)
        if kwargs:
            _walk(tuple(kwargs.values()), ledger.seen)
        if self.inert is not None and self.inert(func, args):
            return args[0] if func._schema.returns else None
        if func is _ITEM:
            # A fake tensor whose value fake mode follows (an optimizer's step count, read by
            # each parameter's bias correction): its value, read off the real tensor it keeps,
            # as fake mode would. No storage is made.
            constant = getattr(args[0], "constant", None)
            if constant is not None:
                with unset_fake_temporarily():
                    return constant.item()
        kwargs = kwargs or {}
        if func in _MATMULS and self.fp32_matmul and _half_on_cpu(args):
            dtype = args[0].dtype
            out = func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
            out = out.to(dtype)
        else:
            out = func(*args, **kwargs)
        if not func.is_view:  # a view's storage is its input's, just seen
            _walk(out, ledger.track)
        if self.observer is not None:
            self.observer(func, args, kwargs, out)
        return out


def _walk(obj: Any, track: Callable[[torch.Tensor], object]) -> None:
    """Tensors in op arguments and results: plain tensors, lists and tuples of them. Hand-written
    because pytree's general walk was most of the meter's overhead."""
    if isinstance(obj, torch.Tensor):
        track(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                track(item)
            elif isinstance(item, (list, tuple)):
                _walk(item, track)


def _half_on_cpu(args: tuple[Any, ...]) -> bool:
    """All tensor arguments are real CPU tensors of one half-precision dtype."""
    dtype = getattr(args[0], "dtype", None)
    if dtype not in _HALF:
        return False
    return all(
        type(a) in _PLAIN and a.dtype == dtype and a.device.type == "cpu"
        for a in args
        if isinstance(a, torch.Tensor)
    )
