"""What the fake meter changes while it is entered, so that library code runs on fake tensors
as it does on real ones, and what it need not run at all.

* ``Module.to()`` (peft moves every adapter layer with it) swaps each fake parameter through
  ``torch.utils.swap_tensors`` whatever ``set_swap_module_params_on_conversion`` says, and that
  refuses a tensor with a weak reference, which FakeTensorMode's converter memo holds on nearly
  every fake tensor (pytorch/pytorch#148977). As the fix proposed upstream (#178584), the memo
  entries of the two tensors being swapped are dropped. A ``to()`` that changes nothing
  (peft moves each new adapter to its base layer's device) returns the module, as it leaves a
  real one as it was, instead of swapping every parameter for an equal one.
* transformers reads position ids to see whether sequences are packed, and on fake data (no
  values) builds the causal mask the real run skips. Position ids that the meter saw made by
  ``arange`` (transformers' own, when none are passed) are consecutive: those get the real
  run's answer, "not packed".
* Ops that allocate nothing and only write values (``InertOps``) are not handed to
  FakeTensorMode, whose per-op cost is most of a trace.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["InertOps", "Ramps", "module_to", "swap_tensors"]

# Data-free ops that make a run of consecutive numbers, and ops that keep it one.
_ARANGE: Final = frozenset(
    {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}
)
_SHIFT: Final = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor})
_COPY: Final = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.clone.default})


class Ramps:
    """Storages known to hold consecutive numbers n, n+1, ...: made by ``arange`` with step 1,
    shifted by a scalar or copied. transformers makes its default position ids this way. It
    observes the ops the ledger sees (the step's own), after each has run."""

    def __init__(self) -> None:
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __call__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if func in _ARANGE:
            ramp = (args[2] if len(args) > 2 else kwargs.get("step", 1)) == 1
        elif func in _SHIFT:
            ramp = any(self._read_in_order(a) and _is_scalar(b) for a, b in (args, args[::-1]))
        else:
            ramp = func in _COPY and self._read_in_order(args[0])
        if ramp:
            self._storages[out.untyped_storage()] = True

    def holds_ramp(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage() in self._storages

    def _read_in_order(self, t: object) -> bool:
        """A contiguous view of a ramp: an op's contiguous output from it is a ramp too."""
        return isinstance(t, torch.Tensor) and self.holds_ramp(t) and t.is_contiguous()

    def consecutive(self, t: torch.Tensor) -> bool:
        """Each row of ``t`` counts up by one: a ramp read with unit stride on the last dim."""
        return self.holds_ramp(t) and t.dim() > 0 and (t.stride(-1) == 1 or t.size(-1) == 1)


# In-place ops that only write values: weight initialisation (nn.init, peft's adapters,
# transformers' _init_weights) and the fills that zero a buffer.
_FILLS: Final = frozenset(
    {
        "aten::uniform_",
        "aten::normal_",
        "aten::zero_",
        "aten::fill_",
        "aten::bernoulli_",
        "aten::exponential_",
        "aten::random_",
        "aten::erfinv_",
    }
)


class InertOps:
    """Operators that allocate nothing and change no size, only values:

    * torch's in-place foreach ops (``_foreach_mul_``, ``_foreach_addcdiv_``), an optimizer's
      whole update, which FakeTensorMode runs one tensor at a time to check shapes the
      optimizer made equal: most of a traced optimizer step;
    * the in-place random and constant fills of weight initialisation (``_FILLS``): a 32B
      LoRA step builds 448 adapters, each initialised through several of them.

    Their version-counter bump is made before any dispatch mode sees the op. They still run on
    tensors whose value fake mode follows (an optimizer's step count, read back as a number)."""

    def __init__(self) -> None:
        self._inert: dict[Any, bool] = {}

    def __call__(self, func: Any, args: tuple[Any, ...]) -> bool:
        inert = self._inert.get(func)
        if inert is None:
            schema = func._schema
            name = schema.name
            inert = self._inert[func] = (
                name.startswith("aten::_foreach_") and name.endswith("_") and not schema.returns
            ) or name in _FILLS
        if not inert:
            return False
        written = args[0]
        if isinstance(written, torch.Tensor):
            return isinstance(written, FakeTensor) and written.constant is None
        return not any(isinstance(t, FakeTensor) and t.constant is not None for t in written)


def _is_scalar(x: object) -> bool:
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _forget(t: torch.Tensor) -> None:
    """Drop ``t`` from its fake mode's converter memo, whose weak reference blocks a swap."""
    if not isinstance(t, FakeTensor):
        return
    memo = t.fake_mode.fake_tensor_converter.tensor_memo
    for ref in weakref.getweakrefs(t):
        if isinstance(ref, weakref.KeyedRef) and memo.get(ref.key) is t:
            del memo[ref.key]


_swap_original = torch.utils.swap_tensors


def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
    _forget(t1)
    _forget(t2)
    _swap_original(t1, t2)  # type: ignore[no-untyped-call]


_module_to_original = torch.nn.Module.to


def module_to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if memory_format is None and (dtype is None or dtype.is_floating_point or dtype.is_complex):
        if _already(module, device, dtype):
            return module
    return _module_to_original(module, *args, **kwargs)


def _already(
    module: torch.nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> bool:
    """Every tensor ``module.to(device, dtype)`` would convert is fake and already there, and
    no module overrides the conversion."""
    for m in module.modules():
        if type(m)._apply is not torch.nn.Module._apply:
            return False
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is None:
                continue
            if not isinstance(t, FakeTensor) or t.grad is not None:
                return False
            if device is not None and t.device != device:
                return False
            if dtype is not None and (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
                return False
    return True
