"""Keeps the objects a process's imports made out of the garbage collector's passes.

The libraries a step needs (torch, transformers, peft, DeepSpeed) leave about half a million
objects, and the collector's first full pass walks every one: 0.2-0.3 s, spent inside the
first step. A worker server imports this module last, after its preload, so none of its forked
cases pays that pass; ``pytest-vram estimate`` imports it once its libraries are imported.
Frozen objects are never collected as cycles (refcounting still frees the others), so only
processes that live for one command, or that fork short-lived children, do this; calling
``main(["estimate", ...])`` inside another process freezes that process's objects too.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_objects"]


def freeze_objects() -> None:
    """Move every object alive now out of the collector's view (``gc.freeze``)."""
    gc.collect()  # the imports' garbage first, or it would be kept for the process's life
    gc.freeze()


freeze_objects()
