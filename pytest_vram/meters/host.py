"""Byte-exact accounting of live tensor storage, by watching every op through torch dispatch.

Every storage an op reads or writes is registered once with a weak reference whose callback
fires when torch frees it, so the live total is exact and the same on every run. The peak's
breakdown is classified after the step (a gradient is only known to be one once it sits in
``.grad``), from the set of storages that were live at the peak.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, final

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_vram.meters.base import Breakdown, Roles, StepMeasure

__all__ = ["HostMeter", "StorageLedger"]


@final
class StorageLedger:
    """Live storages, their bytes, and the live set at the peak of the current window."""

    def __init__(self) -> None:
        # Keyed by the StorageImpl address (``_cdata``), unique while the storage lives; torch
        # keeps one Python object per live storage, whose weakref callback fires when it dies.
        self._sid_of: dict[int, int] = {}
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._live: dict[int, int] = {}  # storage id -> bytes
        self._ids = itertools.count()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._peak_live: dict[int, int] = {}
        # A new peak is copied lazily, at the first free after it: until then the live set
        # only grows, so it still is the peak set.
        self._peak_pending = False
        self.closed = False

    def track(self, t: torch.Tensor) -> int | None:
        """Register ``t``'s storage if new; re-read its size (an ``out=`` op may resize it).
        Meta tensors hold no memory (DeepSpeed ZeRO-1/2 keep some): they are not counted."""
        if t.is_meta:
            return None
        st = t.untyped_storage()
        sid = self._sid_of.get(st._cdata)
        if sid is None:
            return self._register(st)
        if st.nbytes() != self._live[sid]:
            self.resized(st)
        return sid

    def seen(self, t: torch.Tensor) -> None:
        """An op's input: only new storages matter (a resize shows on the op that did it)."""
        if t.is_meta:
            return
        st = t.untyped_storage()
        if st._cdata not in self._sid_of:
            self._register(st)

    def _register(self, st: torch.UntypedStorage) -> int:
        key = st._cdata
        sid = next(self._ids)
        self._sid_of[key] = sid
        self._refs[sid] = weakref.ref(st, self._freed_callback(sid, key))
        self._grow(sid, st.nbytes())
        return sid

    def resized(self, st: torch.UntypedStorage) -> None:
        sid = self._sid_of.get(st._cdata)
        if sid is None:
            return
        old = self._live[sid]
        new = st.nbytes()
        if new < old:
            self._snapshot_if_pending()
        self.live_bytes += new - old
        self._live[sid] = new
        self._note_peak()

    def _freed_callback(self, sid: int, key: int) -> Callable[[Any], None]:
        def freed(_ref: Any) -> None:
            if not self.closed:
                self._snapshot_if_pending()
                self.live_bytes -= self._live.pop(sid)
                del self._refs[sid]
                if self._sid_of.get(key) == sid:
                    del self._sid_of[key]

        return freed

    def _grow(self, sid: int, nbytes: int) -> None:
        self._live[sid] = nbytes
        self.live_bytes += nbytes
        self._note_peak()

    def _note_peak(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_pending = True

    def _snapshot_if_pending(self) -> None:
        if self._peak_pending:
            self._peak_live = dict(self._live)
            self._peak_pending = False

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self._peak_live = dict(self._live)
        self._peak_pending = False

    def peak_live(self) -> dict[int, int]:
        self._snapshot_if_pending()
        return self._peak_live


def classify(ledger: StorageLedger, peak_live: dict[int, int], roles: Roles) -> Breakdown:
    """Split the peak's live set by role; a storage counts once, in the first role that holds it."""
    seen: set[int] = set()

    def total(tensors: Iterable[torch.Tensor]) -> int:
        nbytes = 0
        for t in tensors:
            sid = ledger.track(t)
            if sid is not None and sid in peak_live and sid not in seen:
                seen.add(sid)
                nbytes += peak_live[sid]
        return nbytes

    grad = total(roles.grads)
    opt = total(roles.optimizer)
    param = total(roles.params)
    buffer = total(roles.buffers)
    return Breakdown(
        param_bytes=param,
        buffer_bytes=buffer,
        grad_bytes=grad,
        optimizer_bytes=opt,
        activation_bytes=sum(peak_live.values()) - grad - opt - param - buffer,
    )


class _Watch(TorchDispatchMode):
    def __init__(self, ledger: StorageLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # Inputs too: a tensor made outside any op (from_numpy, unpickled) counts once it is used.
        ledger = self.ledger
        _walk(args, ledger.seen)
        if kwargs:
            _walk(tuple(kwargs.values()), ledger.seen)
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view's storage is its input's, just seen
            _walk(out, ledger.track)
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


@final
class HostMeter:
    """Exact live tensor bytes on the CPU; deterministic for a given spec and seed."""

    name = "host"
    device = "cpu"

    def __init__(self) -> None:
        self.ledger = StorageLedger()
        self._mode = _Watch(self.ledger)
        self._orig_resize: Callable[..., Any] | None = None

    def fingerprint(self) -> str:
        return "host-cpu"

    def __enter__(self) -> HostMeter:
        # Storage.resize_ does not go through dispatch (torch's MemTracker patches it the same way).
        orig = self._orig_resize = torch.UntypedStorage.resize_
        ledger = self.ledger

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            ledger.resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(None, None, None)
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        self.ledger.closed = True

    def step_begin(self) -> None:
        self.ledger.reset_peak()

    def step_end(self, roles: Roles) -> StepMeasure:
        peak_live = self.ledger.peak_live()
        return StepMeasure(self.ledger.peak_bytes, classify(self.ledger, peak_live, roles))
