"""What the padding-free and reduced-LM-head tests share: the toy data, the tiny families they run
on, and their tolerance."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_rlhf.toy.families import build_tiny
from tests.paths import TOY_DATA

PREFERENCE = str(TOY_DATA / "preference_train.jsonl")
UNPAIRED = str(TOY_DATA / "unpaired_train.jsonl")
FAMILIES = ["llama", "qwen2", "gpt2", "gemma2", "mixtral"]  # mixtral: routing is per token, so packing keeps it
#: Families whose forward changes the logits after the LM head (soft-capping, a logit scale, a division):
#: their head is never fused with the log-probs.
AFTER_HEAD = {"gemma2", "cohere", "granite"}
TOL = dict(atol=1e-5, rtol=1e-5)


def move_off_reference(bank, train_mode: str) -> None:
    """Make a fresh policy differ from its reference: LoRA B off zero, or (``full``) trained weights nudged."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif train_mode == "full" and param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.01)


def build_families(root: Path, families: list[str]) -> dict[str, str]:
    """Tiny random models of ``families`` under ``root``: family -> model directory."""
    return {family: str(build_tiny(family, root / family)) for family in families}
