"""A session's simulated ZeRO traces, kept for its other ZeRO specs of the same step.

The fake meter lays a ZeRO case out from a trace of the step without DeepSpeed
(``simulation.plain``), and that trace is the same for every stage, offload and rank count of
one step: pytest-vram's own DeepSpeed config changes only the dtype the engine casts the model
to (its precision, part of the plain spec) and the buckets the layout reads (from the model's
largest parameter, in the traced config). A comparison of stages or offload at real size
(the LLaMA-Factory 8-GPU orderings: LoRA 4-bit with and without offload) traces the step once.

Each case runs in its own child, so the traces live in a folder the session owns and removes:
one JSON file per trace, with the trace's memory snapshot beside it where one was recorded.
A user's DeepSpeed file (``deepspeed=``) is resolved against the model ("auto" values), so its
cases are traced every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Final, final

from pytest_vram import files, methods
from pytest_vram.meters.memory_viz import snapshot_filename
from pytest_vram.result import MemoryResult
from pytest_vram.spec import StepSpec
from pytest_vram.zero.config import ds_config

__all__ = ["TraceStore"]

# What else a trace depends on: the allocator settings its prediction replays under.
_ENVIRONMENT: Final = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


@final
class TraceStore:
    """The traces of one session, in ``directory``; a kept trace's snapshot is copied to
    ``snapshot_dir`` for each case that reuses it (None: the case records none)."""

    def __init__(self, directory: str, snapshot_dir: str | None = None) -> None:
        self.directory = Path(directory)
        self.snapshot_dir = snapshot_dir

    @staticmethod
    def key(plain: StepSpec, spec: StepSpec) -> str | None:
        """The trace of ``plain`` made for ``spec``; None for a spec whose trace is not kept."""
        if spec.deepspeed:
            return None
        parts = {
            "plain": plain.to_json(),
            # A method or optimizer registered by a test under a name another one had.
            "method": _qualname(methods.METHODS[plain.method]),
            "optimizer": _qualname(methods.OPTIMIZERS[plain.optimizer]),
            "environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str, spec: StepSpec) -> MemoryResult | None:
        """The kept trace for ``key``, with ``spec``'s DeepSpeed config and, where the trace
        has a snapshot and this case records one, a copy of it."""
        path = self.directory / f"{key}.json"
        try:
            traced = MemoryResult.from_json(path.read_text())
        except (OSError, ValueError):
            return None  # none kept (or unreadable): traced again
        config = traced.zero_config
        if config is None:
            return None
        bucket = int(config["zero_optimization"]["reduce_bucket_size"])
        snapshot = None
        kept = self.directory / f"{key}.pickle"
        if self.snapshot_dir is not None and kept.exists():
            os.makedirs(self.snapshot_dir, exist_ok=True)
            snapshot = os.path.join(self.snapshot_dir, snapshot_filename(traced.label))
            _place(kept, snapshot)
        # ds_config sizes the buckets as max(largest parameter, 2**16): the bucket is that.
        return dataclasses.replace(
            traced, zero_config=ds_config(spec, bucket), snapshot_path=snapshot
        )

    def put(self, key: str, traced: MemoryResult) -> None:
        """Keep ``traced`` (and its snapshot) for the session's next spec of the same step;
        written whole or not at all."""
        self.directory.mkdir(parents=True, exist_ok=True)
        snapshot = traced.snapshot_path
        if snapshot is not None and os.path.exists(snapshot):
            with files.replaced(self.directory / f"{key}.pickle") as tmp:
                _place(snapshot, tmp)
        files.write_text(self.directory / f"{key}.json", traced.to_json())


def _place(source: str | Path, target: str | Path) -> None:
    """``source``'s content at ``target`` (absent): a hard link where the file system allows
    one (a snapshot is written once and never changed; the session deletes or moves the
    case's copy), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
