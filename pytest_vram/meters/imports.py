"""Modules first imported inside a meter are imported unmeasured.

What a library makes when its module runs (bitsandbytes' NF4 table, a cached constant) is the
library's, not the step's: the worker server imports its libraries before any case for that
reason, and ``estimate`` imports them lazily, inside the trace. Under the fake meter it must
also be real, or the module keeps fake tensors that break its later use in the process.

Every import of a module not yet in ``sys.modules`` goes through importlib's
``_find_and_load`` (the import statement looks it up on ``importlib._bootstrap`` at each call,
``importlib.import_module`` by name in that module), so wrapping it catches them all: the
outermost import runs inside the meter's context, nested ones inside it.
"""

from __future__ import annotations

import contextlib
import importlib._bootstrap as bootstrap
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["unmeasured"]

_NAME = "_find_and_load"


@contextlib.contextmanager
def unmeasured(around: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
    """While inside, each module first imported runs inside ``around()``."""
    original = getattr(bootstrap, _NAME)
    local = threading.local()

    def find_and_load(name: str, import_: Any) -> Any:
        if getattr(local, "importing", False):
            return original(name, import_)
        local.importing = True
        try:
            with around():
                return original(name, import_)
        finally:
            local.importing = False

    setattr(bootstrap, _NAME, find_and_load)
    try:
        yield
    finally:
        setattr(bootstrap, _NAME, original)
