"""Byte-exact accounting of live tensor storage, by watching every op through torch dispatch.

Every storage an op reads or writes is registered once with a weak reference whose callback
fires when torch frees it, so the live total is exact and the same on every run. The peak's
breakdown is classified after the step (a gradient is only known to be one once it sits in
``.grad``), from the set of storages that were live at the peak.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, final

import torch

from pytest_vram.meters import imports
from pytest_vram.meters.base import (
    FIXED_FINGERPRINTS,
    HostOffloadTagging,
    MemorySnapshots,
    Meter,
    Roles,
)
from pytest_vram.meters.events import ALLOC, FREE, EventLog
from pytest_vram.meters.memory_viz import snapshot_filename, write_snapshot
from pytest_vram.meters.watch import Inert, OpObserver, Watch
from pytest_vram.result import Breakdown, StepMeasure
from pytest_vram.timeline import Timeline

__all__ = ["HostMeter", "OpObserver", "StorageLedger"]


@final
class StorageLedger:
    """Live storages, their bytes, and the live set at the peak of the current window."""

    def __init__(self, events: EventLog | None = None) -> None:
        self.events = events if events is not None else EventLog()
        # Keyed by the StorageImpl address (``_cdata``), unique while the storage lives; torch
        # keeps one Python object per live storage, whose weakref callback fires when it dies.
        self._sid_of: dict[int, int] = {}
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._released: set[int] = set()  # freed by a replay before their tensors died
        self._live: dict[int, int] = {}  # storage id -> bytes
        self._ids = itertools.count()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._peak_live: dict[int, int] = {}
        # A new peak is copied lazily, at the first free after it: until then the live set
        # only grows, so it still is the peak set.
        self._peak_pending = False
        self.closed = False
        # Offloaded state (DeepSpeed's host copies) lives in host memory, outside the device
        # peak: such storages move from ``_live`` to ``_host``.
        self._host: dict[int, int] = {}
        self.host_bytes = 0
        self.host_peak_bytes = 0
        self.host_scope = False  # new storages are host memory (an offloaded optimizer step)
        # Storages another ledger counts (a layer probe's: meters.layers): known here, and
        # never counted or logged.
        self.outside: dict[int, int] | None = None

    def track(self, t: torch.Tensor) -> int | None:
        """Register ``t``'s storage if new; re-read its size (an ``out=`` op may resize it).
        Meta tensors hold no memory (DeepSpeed ZeRO-1/2 keep some): they are not counted. Only
        new storages are asked ``is_meta``, which on a fake tensor is an op (prim.device)."""
        st = t.untyped_storage()
        sid = self._sid_of.get(st._cdata)
        if sid is None:
            return None if t.is_meta else self._register(st)
        if st.nbytes() != self._live.get(sid, self._host.get(sid)) and sid not in self._released:
            self.resized(st)
        return sid

    def seen(self, t: torch.Tensor) -> None:
        """An op's input: only new storages matter (a resize shows on the op that did it)."""
        st = t.untyped_storage()
        if st._cdata not in self._sid_of and not t.is_meta:
            self._register(st)

    def _register(self, st: torch.UntypedStorage) -> int:
        key = st._cdata
        sid = next(self._ids)
        self._sid_of[key] = sid
        self._refs[sid] = weakref.ref(st, self._freed_callback(sid, key))
        if self.outside is not None and key in self.outside:
            self._live[sid] = st.nbytes()
        else:
            self._grow(sid, st.nbytes())
        return sid

    def known(self) -> dict[int, int]:
        """The storages this ledger knows (read as ``outside`` by another)."""
        return self._sid_of

    def resized(self, st: torch.UntypedStorage) -> None:
        sid = self._sid_of.get(st._cdata)
        if sid is None:
            return
        if sid in self._host:
            self.host_bytes += st.nbytes() - self._host[sid]
            self._host[sid] = st.nbytes()
            self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
            return
        old = self._live[sid]
        new = st.nbytes()
        if new == old:
            return
        if new < old:
            self._snapshot_if_pending()
        # Logged as the old size freed, then the new allocated; the ledger holds a storage at
        # one size at a time (torch allocates the new block first: allocator.events_of replays
        # it so).
        self.events.add(FREE, sid, old, self.live_bytes - old)
        self.live_bytes += new - old
        self._live[sid] = new
        self.events.add(ALLOC, sid, new, self.live_bytes)
        self._note_peak()

    def _freed_callback(self, sid: int, key: int) -> Callable[[Any], None]:
        def freed(_ref: Any) -> None:
            if not self.closed:
                if sid in self._released:
                    self._released.discard(sid)
                elif sid in self._host:
                    self.host_bytes -= self._host.pop(sid)
                else:
                    self._snapshot_if_pending()
                    nbytes = self._live.pop(sid)
                    self.live_bytes -= nbytes
                    self.events.add(FREE, sid, nbytes, self.live_bytes)
                del self._refs[sid]
                if self._sid_of.get(key) == sid:
                    del self._sid_of[key]

        return freed

    # A step replayed from an earlier one (``meters.repeat``): its storages exist only here,
    # until ``adopt`` gives one a real tensor.

    def replay_alloc(
        self, index: int, op: int, sid: int | None = None, log: EventLog | None = None
    ) -> int:
        """Allocation event ``index`` of ``log`` (this ledger's by default) again at operator
        ``op``: a new storage, or ``sid`` at its new size (a resize); the storage's id."""
        sid = next(self._ids) if sid is None else sid
        nbytes = (self.events if log is None else log).nbytes[index]
        self._live[sid] = nbytes
        self.live_bytes += nbytes
        self.events.add_replayed(index, sid, self.live_bytes, op, log)
        self._note_peak()
        return sid

    def replay_free(self, index: int, sid: int, op: int, log: EventLog | None = None) -> None:
        """Free event ``index`` of ``log`` again, of storage ``sid``, at operator ``op``. A
        storage a real tensor still holds is released: its real free later is not counted."""
        self._snapshot_if_pending()
        self.live_bytes -= self._live.pop(sid)
        self.events.add_replayed(index, sid, self.live_bytes, op, log)
        if sid in self._refs:
            self._released.add(sid)

    def adopt(self, t: torch.Tensor, sid: int) -> None:
        """``t``, made while the ledger was paused, is replayed storage ``sid``: its free is
        that storage's."""
        st = t.untyped_storage()
        if st.nbytes() != self._live.get(sid):
            raise ValueError(f"storage of {st.nbytes()} B cannot be replayed storage {sid}")
        key = st._cdata
        self._sid_of[key] = sid
        self._refs[sid] = weakref.ref(st, self._freed_callback(sid, key))

    def is_live(self, sid: int) -> bool:
        return sid in self._live or sid in self._host

    def mark_host(self, t: torch.Tensor) -> None:
        """``t``'s storage is host memory (offloaded): out of the device total from now on."""
        sid = self.track(t)
        if sid is None or sid in self._host:
            return
        self._snapshot_if_pending()
        nbytes = self._live.pop(sid)
        self.live_bytes -= nbytes
        self.events.add(FREE, sid, nbytes, self.live_bytes)
        self._add_host(sid, nbytes)

    def _add_host(self, sid: int, nbytes: int) -> None:
        self._host[sid] = nbytes
        self.host_bytes += nbytes
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)

    def _grow(self, sid: int, nbytes: int) -> None:
        if self.host_scope:
            self._add_host(sid, nbytes)
            return
        self._live[sid] = nbytes
        self.live_bytes += nbytes
        self.events.add(ALLOC, sid, nbytes, self.live_bytes)
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
        self.host_peak_bytes = self.host_bytes
        self.peak_bytes = self.live_bytes
        self._peak_live = dict(self._live)
        self._peak_pending = False

    def peak_live(self) -> dict[int, int]:
        self._snapshot_if_pending()
        return self._peak_live


ROLE_ORDER = ("grads", "optimizer", "params", "buffers")


def role_sids(ledger: StorageLedger, roles: Roles) -> dict[str, set[int]]:
    """Storage ids by role (registering storages not seen yet)."""
    out: dict[str, set[int]] = {}
    for role in ROLE_ORDER:
        sids = (ledger.track(t) for t in getattr(roles, role))
        out[role] = {sid for sid in sids if sid is not None}
    return out


def classify(peak_live: dict[int, int], sids: dict[str, set[int]]) -> Breakdown:
    """Split the peak's live set by role; a storage counts once, in the first role that holds it."""
    seen: set[int] = set()
    nbytes: dict[str, int] = {}
    for role in ROLE_ORDER:
        mine = (sids.get(role, set()) & peak_live.keys()) - seen
        seen |= mine
        nbytes[role] = sum(peak_live[sid] for sid in mine)
    return Breakdown(
        param_bytes=nbytes["params"],
        buffer_bytes=nbytes["buffers"],
        grad_bytes=nbytes["grads"],
        optimizer_bytes=nbytes["optimizer"],
        activation_bytes=sum(peak_live.values()) - sum(nbytes.values()),
    )


@final
class HostMeter(Meter, HostOffloadTagging, MemorySnapshots):
    """Exact live tensor bytes on the CPU; deterministic for a given spec and seed."""

    name = "host"
    device = "cpu"
    FINGERPRINT: Final = FIXED_FINGERPRINTS["host"]  # every CPU counts the same bytes

    def __init__(self, snapshot_dir: str | None = None, *, fp32_matmul: bool = True) -> None:
        """``fp32_matmul``: run bf16 and fp16 matmuls through torch's fp32 kernel (see
        ``meters.watch``); the bytes counted are the same either way."""
        self.snapshot_dir = snapshot_dir
        self.snapshot_label: str | None = None  # names the snapshot file; set before entering
        self.snapshot_path: str | None = None  # the snapshot written by the last exit
        # A snapshot shows who allocated each block: the stacks are recorded only for one.
        self.ledger = StorageLedger(EventLog(frames=snapshot_dir is not None))
        self._mode = Watch(self.ledger)
        self._mode.fp32_matmul = fp32_matmul
        self._orig_resize: Callable[..., Any] | None = None
        self._noted: dict[str, set[int]] = {}
        # What a module first imported inside runs in (meters.imports).
        self.import_scope: Callable[[], contextlib.AbstractContextManager[object]] = self.paused
        self._imports: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

    def fingerprint(self) -> str:
        return self.FINGERPRINT

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops inside are not seen: what they make, the ledger adopts or never counts."""
        was, self._mode.paused = self._mode.paused, True
        try:
            yield
        finally:
            self._mode.paused = was

    @property
    def noted(self) -> dict[str, set[int]]:
        """Storage ids ``note`` was given this step, by role."""
        return self._noted

    @contextlib.contextmanager
    def recording_into(self, ledger: StorageLedger) -> Iterator[None]:
        """Ops inside are seen by ``ledger`` instead: a layer's probe (``meters.layers``)."""
        was, self._mode.ledger = self._mode.ledger, ledger
        try:
            yield
        finally:
            self._mode.ledger = was

    def observe(
        self,
        observer: OpObserver | None,
        inert: Inert | None = None,
    ) -> None:
        """Call ``observer`` after each op the ledger sees, and skip the ``inert`` ones (None:
        stop)."""
        self._mode.observer = observer
        self._mode.inert = inert

    def __enter__(self) -> HostMeter:
        # Storage.resize_ does not go through dispatch (torch's MemTracker patches it the same way).
        orig = self._orig_resize = torch.UntypedStorage.resize_
        ledger = self.ledger
        self.snapshot_path = None

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            ledger.resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        self._imports = imports.unmeasured(self.import_scope)
        self._imports.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(None, None, None)
        self._imports.__exit__(None, None, None)
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        self.ledger.closed = True
        # A case that raised returns no result to carry the snapshot's path: none is written.
        if self.snapshot_dir is not None and not any(isinstance(e, BaseException) for e in exc):
            os.makedirs(self.snapshot_dir, exist_ok=True)
            path = os.path.join(self.snapshot_dir, snapshot_filename(self.snapshot_label or ""))
            write_snapshot(self.ledger.events, path)
            self.snapshot_path = path

    def step_begin(self) -> None:
        self.ledger.reset_peak()
        self._noted = {}

    def note(self, roles: Roles) -> None:
        """Roles of tensors that may be gone by step_end (DeepSpeed frees its gradient
        partitions inside the step): they still count in their role if live at the peak."""
        for role, sids in role_sids(self.ledger, roles).items():
            self._noted.setdefault(role, set()).update(sids)

    def offloaded(self, tensors: Iterable[torch.Tensor]) -> None:
        """These tensors live in host memory (offloaded state), not on the device."""
        for t in tensors:
            self.ledger.mark_host(t)

    @contextlib.contextmanager
    def host_scope(self) -> Iterator[None]:
        """Everything allocated inside runs on the host (an offloaded optimizer step)."""
        self.ledger.host_scope = True
        try:
            yield
        finally:
            self.ledger.host_scope = False

    def phase(self, name: str, step: int) -> None:
        self.ledger.events.phase(name, step)

    def timeline(self) -> Timeline:
        return self.ledger.events.timeline()

    def step_end(self, roles: Roles) -> StepMeasure:
        peak_live = self.ledger.peak_live()
        sids = role_sids(self.ledger, roles)
        for role, noted in self._noted.items():
            sids[role] |= noted
        return StepMeasure(
            self.ledger.peak_bytes,
            classify(peak_live, sids),
            host_offload_bytes=self.ledger.host_peak_bytes,
        )
