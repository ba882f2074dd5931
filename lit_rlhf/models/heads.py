"""Scalar heads read from the base's last hidden state: reward scores and critic values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScalarHead(nn.Module):
    """A linear map from the last hidden state to one float32 scalar per position.

    Computed in float32 whatever the base dtype or the Trainer's precision, since reward and value
    regressions are sensitive to bf16 rounding.

    Args:
        hidden_size: the base model's hidden size.
        kind: ``score`` (read at the last non-padding token) or ``value`` (read at every token).
    """

    def __init__(self, hidden_size: int, kind: str):
        super().__init__()
        if kind not in ("score", "value"):
            raise ValueError(f"head kind must be 'score' or 'value', got {kind!r}")
        self.kind = kind
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # A small init keeps the first scores near zero, so early KL/advantage terms are not swamped.
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq) float32, under autocast too: ``bf16-mixed`` would run this
        linear in bf16 and round every score and value to 8 significant bits (a reward of 5 to a multiple
        of 1/32, so a group's close rewards tie and their advantages vanish)."""
        # In float32 also when a strategy keeps the weights in bf16 (DeepSpeed's bf16 mode casts the module).
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.linear.weight.float(), self.linear.bias.float()).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row, for right or left padding. (batch,) long."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).max(dim=1).values
