"""Every allocation and free a storage ledger sees, in order, for the timeline and the
memory_viz snapshot of a host or fake case.

An event is a storage that appeared on the device or left it (freed, resized, moved to host
memory as offloaded state), with the live device bytes after it and the index of the operator
that caused it. With ``frames`` on, each event also keeps the Python stack that caused it (the
meter's and torch's dispatch frames left out): the snapshot's "who allocated this".
"""

from __future__ import annotations

import sys
from array import array
from types import CodeType, FrameType
from typing import Final, final

from pytest_vram.timeline import Phase, Timeline, decimate

__all__ = ["ALLOC", "FREE", "EventLog", "Frame"]

ALLOC: Final = 0
FREE: Final = 1
# Innermost frames kept per event: the library call that allocated and the step that called it.
MAX_FRAMES: Final = 48
# Frames of these files say how the meter works, not who allocated.
_SKIPPED: Final = (
    "/pytest_vram/meters/",
    "/torch/utils/_python_dispatch.py",
    "/torch/_subclasses/",
    "/torch/utils/weak.py",
    "/torch/_ops.py",
)

Frame = tuple[str, int, str]  # filename, line, function: what memory_viz shows


@final
class EventLog:
    def __init__(self, frames: bool = False) -> None:
        self.frames = frames
        self.ops = 0  # operators dispatched so far: the x of the timeline
        # Arrays, not lists: a 32B trace makes hundreds of thousands of events.
        self.kind = array("b")
        self.sid = array("q")
        self.nbytes = array("q")
        self.op = array("q")
        self.live_bytes = array("q")  # device bytes live after the event
        self.stack = array("q")  # index into _stacks, -1 without frames
        # A stack is its frames' code objects and instruction offsets; a frame's line number
        # costs a walk of its code's line table, so it is read only in frames_of.
        self._stacks: list[tuple[tuple[CodeType, int], ...]] = []
        # Keyed by id(code) and offset, which hash much faster than code objects. Each stored
        # stack holds its codes, so no id in a key can be reused by another code object.
        self._stack_ids: dict[tuple[int, ...], int] = {}
        # Another log's stacks replayed here (a layer probe's), by id(log): each interned once.
        # The log is kept with them, so its id is not another log's.
        self._imported: dict[int, tuple[EventLog, dict[int, int]]] = {}
        self._skip: dict[str, bool] = {}
        self._lines: dict[tuple[CodeType, int], int] = {}
        self.phases: list[Phase] = []

    def __len__(self) -> int:
        return len(self.kind)

    def add(self, kind: int, sid: int, nbytes: int, live_bytes: int) -> None:
        self.kind.append(kind)
        self.sid.append(sid)
        self.nbytes.append(nbytes)
        self.op.append(self.ops)
        self.live_bytes.append(live_bytes)
        self.stack.append(self._capture(sys._getframe(1)) if self.frames else -1)

    def add_replayed(
        self, index: int, sid: int, live_bytes: int, op: int, source: EventLog | None = None
    ) -> None:
        """Event ``index`` of ``source`` (this log by default) again, for storage ``sid`` at
        operator ``op``: a step or layer the fake meter replays from an earlier one, with that
        one's stack."""
        log = self if source is None else source
        self.kind.append(log.kind[index])
        self.sid.append(sid)
        self.nbytes.append(log.nbytes[index])
        self.op.append(op)
        self.live_bytes.append(live_bytes)
        stack = log.stack[index]
        if log is not self and stack >= 0:
            stack = self._import(log, stack) if self.frames else -1
        self.stack.append(stack)

    def _import(self, source: EventLog, stack: int) -> int:
        _, ids = self._imported.setdefault(id(source), (source, {}))
        found = ids.get(stack)
        if found is None:
            found = ids[stack] = self._intern(source._stacks[stack])
        return found

    def _intern(self, codes: tuple[tuple[CodeType, int], ...]) -> int:
        flat = tuple(x for code, offset in codes for x in (id(code), offset))
        found = self._stack_ids.get(flat)
        if found is None:
            found = self._stack_ids[flat] = len(self._stacks)
            self._stacks.append(codes)
        return found

    def phase(self, name: str, step: int) -> None:
        # The phase's first operator is the next one: events at ``self.ops`` came from the
        # operator that ended the phase before.
        start = self.ops + 1
        if self.phases and self.phases[-1].start == start:
            self.phases.pop()  # an empty phase (no operator ran in it) is not drawn
        self.phases.append(Phase(start, name, step))

    def _capture(self, frame: FrameType | None) -> int:
        skip = self._skip
        codes: list[CodeType] = []
        key: list[int] = []  # id(code), offset, id(code), offset, ...
        while frame is not None and len(codes) < MAX_FRAMES:
            code = frame.f_code
            name = code.co_filename
            skipped = skip.get(name)
            if skipped is None:
                path = name.replace("\\", "/")
                skipped = skip[name] = any(part in path for part in _SKIPPED)
            if not skipped:
                codes.append(code)
                key.append(id(code))
                key.append(frame.f_lasti)
            frame = frame.f_back
        flat = tuple(key)
        found = self._stack_ids.get(flat)
        if found is None:
            found = self._stack_ids[flat] = len(self._stacks)
            self._stacks.append(tuple(zip(codes, key[1::2], strict=True)))
        return found

    def _line(self, code: CodeType, offset: int) -> int:
        found = self._lines.get((code, offset))
        if found is None:
            found = code.co_firstlineno
            for start, end, line in code.co_lines():
                if start <= offset < end:
                    found = line if line is not None else found
                    break
            self._lines[(code, offset)] = found
        return found

    def frames_of(self, index: int) -> list[Frame]:
        """The stack of event ``index``, innermost first; empty without frames."""
        stack = self.stack[index]
        if stack < 0:
            return []
        return [
            (code.co_filename, self._line(code, offset), code.co_name)
            for code, offset in self._stacks[stack]
        ]

    def timeline(self) -> Timeline:
        x, live = decimate(self.op, self.live_bytes)
        return Timeline("op", x, live, tuple(self.phases), events=len(self))
