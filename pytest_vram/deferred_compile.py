"""bitsandbytes imported with its ``torch.compile`` calls made at their first call, not at import.

At import, bitsandbytes wraps its CPU fallbacks in ``torch.compile``, and making those wrappers
imports torch's inductor (0.9 s), for functions a measured step never compiles: under the
meter's dispatch mode Dynamo runs them as they are. ``install()`` puts a finder first on
``sys.meta_path`` that, while bitsandbytes' package runs, makes ``torch.compile(fn)`` return a
function that compiles ``fn`` when it is first called, then calls the compiled one: what
bitsandbytes gets is the same, later. Anything but a plain function goes to torch.compile at once.

``pytest-vram estimate`` installs it (a LoRA estimate imports peft, which imports bitsandbytes),
and the cuda worker server preloads it for its cases' own imports. The host server does not:
DeepSpeed compiles at import too (its Muon optimizer, imported when an engine starts), so there
the inductor is imported once, in the server, rather than in every ZeRO rank.

Importing this module installs it. Torch-free and probes no CUDA until bitsandbytes is imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, final

__all__ = ["deferred", "install"]

_PACKAGE = "bitsandbytes"


def deferred(compile_now: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile``'s signature; a plain function is compiled by ``compile_now`` at its
    first call, with the same options."""

    def compile_later(model: Any = None, **options: Any) -> Any:
        if model is None:  # @torch.compile(dynamic=False)
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile_later


@final
class _Loader(importlib.abc.Loader):
    """bitsandbytes' own loader, with torch.compile deferred while its package module runs."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import torch

        compile_now = torch.compile
        torch.compile = deferred(compile_now)
        try:
            self._loader.exec_module(module)
        finally:
            torch.compile = compile_now

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


@final
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Defer bitsandbytes' compiles in this process (idempotent; nothing once it is imported)."""
    if _PACKAGE not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
