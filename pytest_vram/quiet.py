"""Libraries' chatter that says nothing about the user's step, kept out of pytest-vram's output.

Each entry is one library's logger (or warning's module) and the exact start of one message:
a filter drops that message and nothing else, so the libraries' other warnings and everything
the user's code logs or warns still show. ``install()`` runs in ``pytest-vram estimate`` and in
each case's worker child before the case; importing this module installs it too, so a worker
server can preload it by name before the libraries that talk on import. Torch-free, and it
probes no CUDA: only ``logging`` and ``warnings``.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Final, final

__all__ = ["LOGGED", "install"]

# (logger name, message start): records a logger makes itself are filtered on that logger.
LOGGED: Final[tuple[tuple[str, str], ...]] = (
    # bitsandbytes on an AVX512-bf16 CPU, on import (peft imports it): its optional fused 4-bit
    # kernel lives in the `kernels` package, which is not installed; its own fallback runs.
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    # The same kernel asked of the `kernels` package (transformers 5.25 requires it), with the
    # Hub offline in a case: it cannot check the publisher, and bitsandbytes then falls back.
    (
        "kernels._internals.hf_hub",
        "Skipping publisher trust check for 'kernels-community/",
    ),
    # DeepSpeed guessing its accelerator on import, where nothing set DS_ACCELERATOR: a case
    # sets it (zero.ops.set_accelerator) before DeepSpeed runs; the estimate's estimator functions
    # are arithmetic, the same on any accelerator.
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator"),
)

# Only with ``install(command=True)``, in ``pytest-vram estimate``, which runs no user code: in
# a case these could be the user's own.
_COMMAND_LOGGED: Final[tuple[tuple[str, str], ...]] = (
    # The fake meter's shape error, logged with its traceback before it is raised: the command
    # reports the error itself in one line.
    ("torch._subclasses.fake_tensor", "failed while attempting to run meta for"),
)
# (category, message start, warning's module): the warning names transformers as its module
# (no stacklevel), so user code reading the same property would be hidden too.
_COMMAND_WARNINGS: Final[tuple[tuple[type[Warning], str, str], ...]] = (
    # peft and trl read model.is_gradient_checkpointing, deprecated in transformers 5.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # peft's prepare_model_for_kbit_training (QLoRA with checkpointing) calls the old name.
    (
        FutureWarning,
        "`gradient_checkpointing_enable` is deprecated",
        r"transformers\.modeling_utils",
    ),
)


@final
class _Drop(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install(command: bool = False) -> None:
    """Install the filters in this process (idempotent). ``command``: also the ones only
    ``pytest-vram estimate`` may drop, since it runs no user code."""
    for name, start in (*LOGGED, *(_COMMAND_LOGGED if command else ())):
        logger = logging.getLogger(name)  # the same object the library gets when it imports
        drop = next((f for f in logger.filters if isinstance(f, _Drop)), None)
        if drop is None:
            logger.addFilter(_Drop((start,)))
        elif start not in drop.starts:
            drop.starts = (*drop.starts, start)
    if command:
        for category, start, module in _COMMAND_WARNINGS:
            warnings.filterwarnings("ignore", re.escape(start), category, module)


install()
