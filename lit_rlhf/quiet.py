"""Known noise of the libraries we run on, filtered by exact message so real warnings still show.

Each entry says why it is noise for lit_rlhf. ``install()`` is called by the ``lit-rlhf`` command
and by the test suite (``tests/conftest.py``; the warning filters are repeated in pyproject's
pytest ``filterwarnings``, which pytest re-applies around every test).
"""

from __future__ import annotations

import logging
import re
import warnings

#: (category, message regex) of warnings that say nothing about the user's run.
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # peft reads the deprecated `is_gradient_checkpointing` property of every transformers 5 model it wraps.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # Lightning 2.6's own pytree helper uses a torch API deprecated in torch 2.10+.
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # The bank sets train/eval modes deliberately (frozen reference and teacher in eval mode).
    (Warning, r"Found \d+ module\(s\) in eval mode at the start of training"),
)

#: (logger name, message regex) of log records that are advertisements or optional-kernel notes.
LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # An advertisement printed by every Trainer.
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless cloud logging"),
    ("lightning.fabric.utilities.rank_zero", r"Tip: For seamless cloud logging"),
    # bitsandbytes falls back to its own CPU kernel when the optional `kernels` package is missing.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Filter the known noise (idempotent)."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMatching(message))
