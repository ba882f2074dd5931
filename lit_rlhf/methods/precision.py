"""The Trainer's precision plugin fitted to the bank.

Lightning's plugins assume that every parameter and every float input takes the training dtype. The bank
has float32 parts on purpose: its LoRA adapters and scalar heads (a bf16 adapter drops AdamW's small
steps), and its batches' float fields (precomputed reference log-probs, margins: loss quantities, not
model inputs, which are token ids)."""

from __future__ import annotations

import logging
from functools import partial

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

log = logging.getLogger("lit_rlhf.methods")


def fit_precision_plugin(trainer: pl.Trainer) -> None:
    """Make ``trainer``'s precision plugin hand batches over as collated and, for ``bf16-true`` /
    ``16-true`` (single device, DDP, ``ModelParallelStrategy``), keep the adapters and heads in float32 when
    it casts the module; DeepSpeed's plugin is left as it is (its optimizer keeps float32 master weights).
    Idempotent: ``setup`` runs for every stage on one Trainer.

    A "true" precision casts every float tensor of a batch to its dtype (as for image inputs): in bf16 a
    precomputed sequence log-prob of -40 is rounded to a multiple of 0.25, so DPO's implicit rewards do not
    start at 0 and the reference differs from the one computed on the fly."""
    plugin = trainer.precision_plugin
    if getattr(plugin, "_fitted_to_bank", False):
        return
    plugin._fitted_to_bank = True
    plugin.convert_input = _as_collated
    if isinstance(plugin, HalfPrecision):
        plugin.convert_module = partial(_cast_keeping_float32, plugin.convert_module)


def _as_collated(batch):
    return batch


def _cast_keeping_float32(convert, module: nn.Module) -> nn.Module:
    module = convert(module)
    bank = getattr(module, "bank", None)
    if bank is not None:
        bank.float32_adapters_and_heads()
        if bank.full:
            log.warning("train_mode full under a half 'true' precision trains the base's own weights in half precision: "
                        "AdamW steps below their rounding are lost; bf16-mixed keeps float32 weights")
    return module
