"""``CUDA_VISIBLE_DEVICES`` read as CUDA reads it, in one place.

The pytest process reads it to give each xdist worker its own GPUs (``gpus``), the cuda meter
in the case child to find the NVML device behind torch's ``cuda:N`` (``meters.nvml``). Neither
imports torch here: torch-free and pytest-free, so both processes can import it.

CUDA's rules: unset, every GPU of the machine in the driver's order; set, the comma-separated
entries, each a device index or a ``GPU-``/``MIG-`` UUID (or a unique prefix of one), numbered
``0..n-1`` in the list's order; an empty value hides every GPU. CUDA stops reading at the first
entry it cannot use (``-1`` is the usual way to hide the rest) and ignores everything from there
on; a device listed twice hides every GPU, as torch's own reading of the variable has it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Final, final

__all__ = ["UUID_PREFIXES", "VARIABLE", "Stop", "Visible", "read"]

VARIABLE: Final = "CUDA_VISIBLE_DEVICES"
UUID_PREFIXES: Final = ("GPU-", "MIG-")
_INDEX: Final = re.compile(r"[0-9]+")
_NEGATIVE: Final = re.compile(r"-[0-9]+")


class Stop(enum.Enum):
    """Why CUDA stopped reading the list at an entry."""

    NEGATIVE = "a negative index"  # "-1": meant, the usual way to hide the GPUs after it
    # CUDA reads the leading digits of an entry such as "1gpu" as an index; here it stops the
    # list instead, since whoever wrote it meant something else.
    MALFORMED = "neither a GPU index nor a GPU-/MIG- UUID"
    BEYOND = "an index past the machine's GPUs"


@final
@dataclasses.dataclass(frozen=True)
class Visible:
    """What CUDA makes of one value of the variable.

    ``devices`` are the entries CUDA numbers ``0..n-1``, as written but for an index's leading
    zeros (``"01"`` is ``"1"``); None when the variable is unset and the machine's GPU count
    was not given (every GPU, in the driver's order). ``stop`` and ``stopped_at`` name the entry
    CUDA stopped at, if any; ``repeated`` the device listed twice, if any (``devices`` is then
    empty)."""

    devices: tuple[str, ...] | None
    stop: Stop | None = None
    stopped_at: str = ""
    repeated: str = ""


def read(value: str | None, count: int | None = None) -> Visible:
    """The GPUs CUDA makes visible for this value of the variable (None: unset).

    ``count`` is how many GPUs the driver lists, ignoring the variable, when the caller knows:
    an unset variable then means ``"0"`` to ``str(count - 1)``, and an index at or past it
    stops the list, as in CUDA. Without it, indices are taken as written."""
    if value is None:
        return Visible(None if count is None else tuple(str(i) for i in range(count)))
    devices: list[str] = []
    for part in value.split(",") if value.strip() else ():
        entry = part.strip()
        stop = _stop(entry, count)
        if stop is not None:
            return Visible(tuple(devices), stop, entry)
        device = str(int(entry)) if _INDEX.fullmatch(entry) else entry
        if device in devices:
            return Visible((), repeated=device)
        devices.append(device)
    return Visible(tuple(devices))


def _stop(entry: str, count: int | None) -> Stop | None:
    if _INDEX.fullmatch(entry):
        return Stop.BEYOND if count is not None and int(entry) >= count else None
    if _NEGATIVE.fullmatch(entry):
        return Stop.NEGATIVE
    if entry.startswith(UUID_PREFIXES) and len(entry) > len("GPU-"):
        return None
    return Stop.MALFORMED
