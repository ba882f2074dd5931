"""Exporting what a run trained: a PEFT adapter directory or a merged transformers model."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.methods.base import BankMethod
from lit_rlhf.strategies import gather_trainable, is_sharded


class ExportOnFitEnd(pl.Callback):
    """Export the trained adapter (and optionally the merged model) when ``fit`` ends.

    Args:
        dirpath: where to write; ``<log_dir>/export`` when ``None``.
        merged: also write a merged model (``save_pretrained``) under ``<dirpath>/merged``.
    """

    def __init__(self, dirpath: str | None = None, merged: bool = False):
        self.dirpath = dirpath
        self.merged = merged

    def on_fit_end(self, trainer: pl.Trainer, pl_module: BankMethod) -> None:
        # trainer.log_dir is a collective under DDP (a broadcast): every rank must ask for it.
        root = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")
        if is_sharded(pl_module.bank):
            # FSDP: every rank gathers the trainable shards (a collective); rank 0 loads them into an
            # unsharded bank of its own (on CPU) and writes from it.
            trained = gather_trainable(pl_module.bank)
            if not trainer.is_global_zero:
                return
            pl_module = pl_module.unsharded_copy(trained)
        if not trainer.is_global_zero:
            return
        if not pl_module.bank.full:
            rank_zero_info(f"adapter {pl_module.trained_adapter!r} -> {pl_module.export(root / 'adapter')}")
        if self.merged or pl_module.bank.full:
            rank_zero_info(f"merged model -> {pl_module.export(root / 'merged', merged=True)}")
