"""Reward-model training loss (pairwise Bradley-Terry)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["RewardLoss", "bradley_terry_loss"]


class RewardLoss(NamedTuple):
    """Per-example reward-model loss.

    Attributes:
        losses: ``(batch,)`` per-example loss, differentiable.
        margins: ``(batch,)`` score difference ``rc - rr`` (without the target margin),
            detached; log its mean as ``rewards/margins`` and ``(margins > 0).float().mean()``
            as ``rewards/accuracies``.
    """

    losses: torch.Tensor
    margins: torch.Tensor


def _as_batch(scores: torch.Tensor, name: str) -> torch.Tensor:
    # Score heads often return (batch, 1); accept it rather than broadcast (batch, batch).
    if scores.dim() == 2 and scores.size(-1) == 1:
        scores = scores.squeeze(-1)
    if scores.dim() != 1:
        raise ValueError(f"{name} must have shape (batch,) or (batch, 1), got {tuple(scores.shape)}.")
    return scores


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> RewardLoss:
    """Pairwise Bradley-Terry loss for reward models.

    Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback", arXiv 2203.02155; the margin term from Llama 2 (Touvron et al. 2023, arXiv
    2307.09288); the centring term from Eisenstein et al. 2023, "Helping or Herding?",
    arXiv 2312.09244:

        loss_i = -logσ(rc_i - rr_i - m_i) + c · (rc_i + rr_i)²

    The centring term is added per example so that ``losses.mean()`` equals TRL's
    ``-mean(logσ(...)) + c · mean((rc + rr)²)``; it keeps scores near zero, since the BT
    loss alone only fixes their differences.

    Args:
        chosen_scores, rejected_scores: ``(batch,)`` (or ``(batch, 1)``) scalar scores.
        margin: optional ``(batch,)`` target margin ``m`` (e.g. from preference strength).
        center_coefficient: optional weight ``c`` of the centring term.

    Returns:
        :class:`RewardLoss` with ``losses`` ``(batch,)`` and ``margins = rc - rr`` detached.
    """
    chosen_scores = _as_batch(chosen_scores, "chosen_scores")
    rejected_scores = _as_batch(rejected_scores, "rejected_scores")
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return RewardLoss(losses, diff.detach())
