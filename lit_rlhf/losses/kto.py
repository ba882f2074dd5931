"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions."""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

__all__ = ["KTO_LOSS_TYPES", "KTOLoss", "KTOLossType", "kto_kl_estimate", "kto_loss"]

#: The KTO loss types, written once: the Literal a signature takes and the tuple checks read.
KTOLossType = Literal["kto", "apo_zero_unpaired"]
KTO_LOSS_TYPES: tuple[str, ...] = get_args(KTOLossType)


class KTOLoss(NamedTuple):
    """Per-example KTO loss.

    Attributes:
        losses: ``(batch,)`` per-example loss, differentiable.
        rewards: ``(batch,)`` implicit rewards ``β(π - ref)`` detached; log their mean over
            desirable rows as ``rewards/chosen`` and over undesirable rows as
            ``rewards/rejected``.
        kl: scalar, the reference point actually used (detached, clamped at 0); log as ``kl``.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """Batch estimate of KL(policy ‖ reference), KTO's reference point ``z0``.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv 2402.01306:

        z0 = max(0, mean_i(π(y'_i | x_i) - ref(y'_i | x_i)))

    over *mismatched* pairs (a prompt with another row's completion), so the estimate does
    not use the completion being scored. Detached: no gradient flows through the reference
    point. Under data parallelism pass the rows of every rank (``lit_rlhf.distributed.all_rows``),
    so that every rank shares one estimate, as TRL does.

    Args:
        policy_kl_logps, ref_kl_logps: ``(batch,)`` summed log-probs of the mismatched
            completions under the policy and the reference.

    Returns:
        scalar float tensor ``>= 0``.
    """
    return (policy_kl_logps - ref_kl_logps).float().mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLoss:
    """KTO loss on unpaired examples.

    Ethayarajh et al. 2024, arXiv 2402.01306. With ``r = π - ref`` (log-ratio) and
    ``z0 = max(0, kl)`` detached:

        desirable   (label True):  w_d · (1 - σ(β (r - z0)))
        undesirable (label False): w_u · (1 - σ(β (z0 - r)))

    ``loss_type="apo_zero_unpaired"`` is the unpaired APO-zero loss (D'Oosterlinck et al. 2024,
    "Anchored Preference Optimization", arXiv 2408.06266): the same with the anchor at 0,
    ``w_d (1 - σ(βr))`` and ``w_u σ(βr)``; ``kl`` is ignored (pass 0 and skip its estimate).

    Choose the weights so that ``w_d · n_desirable / (w_u · n_undesirable)`` lies in
    ``[1, 4/3]`` (paper, section 4.2).

    Args:
        policy_logps, ref_logps: ``(batch,)`` summed completion log-probs.
        labels: ``(batch,)`` bool, True for desirable completions.
        kl: scalar reference point, e.g. from :func:`kto_kl_estimate`.
        beta: β > 0.
        desirable_weight, undesirable_weight: ``w_d``, ``w_u``.
        loss_type: one of ``KTO_LOSS_TYPES``.

    Returns:
        :class:`KTOLoss` with ``losses`` ``(batch,)``, ``rewards = β r`` detached, and ``kl``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto_loss: unknown loss_type {loss_type!r}; valid names are {', '.join(KTO_LOSS_TYPES)}.")
    if loss_type == "apo_zero_unpaired":
        kl = 0.0
    if labels.shape != policy_logps.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match policy_logps {tuple(policy_logps.shape)}: one bool per row."
        )
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return KTOLoss(losses, (beta * logratio).detach(), z0)
