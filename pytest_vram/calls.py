"""The label of a ``vram.measure`` call: the function, a short stable form of its arguments, and
its ranks, so two calls of one function with different arguments never share a baseline entry.

Plain data (strings, numbers, paths, and lists, tuples, sets and dicts of them) is written as
Python would; a path (or a string holding an absolute one) under the working directory
relative to it, and one elsewhere under the temporary folder (pytest's ``tmp_path``) as
``<tmp>``. Anything else is named by its type with a digest of its pickled form, since its
``repr`` often holds a memory address that changes every run. A form longer than
``MAX_ARGS_CHARS`` is cut, with a digest of the whole, so the label stays readable.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["MAX_ARGS_CHARS", "TMP", "call_label"]

MAX_ARGS_CHARS: Final = 60
TMP: Final = "<tmp>"
_DIGEST_CHARS: Final = 8
_PLAIN: Final = (str, int, float, bool, complex, bytes, type(None))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]


def _under(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _stable_path(path: str | bytes) -> str | bytes:
    """The same on every machine and in every run: the working directory is the checkout
    (in CI and on a workstation), a temporary folder is new each run."""
    if isinstance(path, bytes) or not os.path.isabs(path):
        return path
    if _under(path, os.getcwd()):
        return os.path.relpath(path)
    return TMP if _under(path, tempfile.gettempdir()) else path


def _form(value: Any) -> str:
    if isinstance(value, str) and os.path.isabs(value):
        return repr(_stable_path(value))
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, os.PathLike):
        return repr(_stable_path(os.fspath(value)))
    if isinstance(value, list):
        return "[" + ", ".join(_form(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_form(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_form(v) for v in value)) + "}" if value else "set()"
    if isinstance(value, Mapping):
        items = sorted((_form(k), _form(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    try:
        digest = _digest(pickle.dumps(value, protocol=4))
    except Exception:  # the job's own pickling check names what cannot be sent
        digest = "?"
    return f"<{type(value).__qualname__}@{digest}>"


def call_label(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], ranks: int | None
) -> str:
    """``module.function(args, key=value) r2``; no parentheses for a call without arguments,
    so an existing baseline of such a call keeps its key."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    parts = [_form(a) for a in args] + [f"{k}={_form(v)}" for k, v in sorted(kwargs.items())]
    if parts:
        form = ", ".join(parts)
        if len(form) > MAX_ARGS_CHARS:
            cut = form[: MAX_ARGS_CHARS - _DIGEST_CHARS - 2]
            form = f"{cut}…@{_digest(form.encode())}"
        name = f"{name}({form})"
    return f"{name} r{ranks}" if ranks is not None else name
