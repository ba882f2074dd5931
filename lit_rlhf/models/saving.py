"""Writing directories so that an interruption never leaves a half-written one behind, and the files
lit_rlhf adds beside PEFT's and transformers' own."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

#: A scalar head's weights (``ScalarHead``), beside an adapter or a merged model: neither PEFT nor
#: ``save_pretrained`` knows the head.
HEAD_FILE = "head.safetensors"
#: What a loader needs beside the weights: the base's fingerprint, the head's kind, paths, statistics.
META_FILE = "lit_rlhf.json"


def write_head_and_meta(directory: str | os.PathLike, head: nn.Module | None, meta: dict) -> None:
    """Write ``head``'s weights to ``HEAD_FILE`` (when there is one) and ``meta`` to ``META_FILE`` in
    ``directory``; ``meta["head"]`` records the head's kind (``None`` without a head)."""
    directory = Path(directory)
    meta = {**meta, "head": getattr(head, "kind", None)}
    if head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_FILE))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def read_adapter_meta(directory: str | os.PathLike) -> dict:
    """The ``META_FILE`` of a saved adapter or model, or ``{}`` when it has none."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename.

    Every file written is fsynced before the rename, and the rename itself after it, so a crash
    or power loss leaves either the old directory or the complete new one. On failure the
    temporary directory is removed and an existing ``path`` is left intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of ``path`` (a rename into it) durable; POSIX only."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(folder)
