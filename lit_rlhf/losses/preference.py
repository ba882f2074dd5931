"""Direct preference optimisation and its family: DPO and variants, SimPO, CPO.

All functions take per-example *summed* completion log-probs of shape ``(batch,)`` (from
:func:`lit_rlhf.losses.sequence_logps`) and return a :class:`PreferenceLoss` whose ``losses``
are per example; the caller reduces (usually ``.mean()``). ``chosen_rewards`` and
``rejected_rewards`` are the implicit rewards users log as ``rewards/chosen``,
``rewards/rejected``; ``rewards/margins`` is their difference and ``rewards/accuracies`` is
``(chosen_rewards > rejected_rewards).float().mean()``.

Notation in the docstrings: ``πc, πr`` policy log-probs of chosen and rejected completions,
``refc, refr`` the reference model's, ``|c|, |r|`` completion lengths in tokens,
``σ`` the logistic sigmoid, ``ε`` the label smoothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "CPO_LOSS_TYPES", "PreferenceLoss", "cpo_loss", "dpo_loss", "orpo_loss", "simpo_loss"]

DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
)
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


class PreferenceLoss(NamedTuple):
    """Per-example preference loss and the implicit rewards users log.

    Attributes:
        losses: ``(batch,)`` per-example loss, differentiable.
        chosen_rewards: ``(batch,)`` implicit reward of the chosen completion, detached.
        rejected_rewards: ``(batch,)`` implicit reward of the rejected completion, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _check_label_smoothing(label_smoothing: float) -> None:
    # At ε = 0.5 the conservative loss no longer depends on which completion was preferred,
    # and the robust loss divides by 1 - 2ε = 0.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")


def _check_loss_type(loss_type: str, valid: tuple[str, ...], where: str) -> None:
    if loss_type not in valid:
        raise ValueError(f"{where}: unknown loss_type {loss_type!r}; valid names are {', '.join(valid)}.")


def _require_lengths(chosen_lengths, rejected_lengths, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            f"{why} normalises log-probs by completion length: pass chosen_lengths and rejected_lengths "
            "((batch,) token counts, e.g. SequenceLogps.num_tokens from sequence_logps)."
        )
    # A zero-length completion would divide by zero; it has no tokens, so its sum is 0 anyway.
    return chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO: with probability ε the preference label is flipped.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor = 0.0,
) -> PreferenceLoss:
    """DPO and its variants that compare policy and reference log-ratios.

    With ``a = πc - refc``, ``b = πr - refr`` (chosen and rejected log-ratios) and
    ``h = a - b``:

    - ``sigmoid``: DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv
      2305.18290), with conservative label smoothing (cDPO, Mitchell 2023, "A note on DPO
      with noisy preferences"): ``-(1-ε) logσ(βh) - ε logσ(-βh)``. TRL 1.16 ignores
      ``label_smoothing`` for ``sigmoid`` (it uses ε only in ``robust``, ``exo_pair`` and ``aot``);
      we keep cDPO's formula because ε > 0 asks for it and ε = 0 (the default) is plain DPO,
      identical to TRL.
    - ``ipo``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences", arXiv 2310.12036): ``(h' - 1/(2β))²`` with length-normalised
      log-ratios ``h' = a/|c| - b/|r|`` (as TRL does); needs ``chosen_lengths`` and
      ``rejected_lengths``. Its rewards use the same normalised log-ratios: ``β a/|c|``,
      ``β b/|r|``.
    - ``hinge``: SLiC / RSO (Zhao et al. 2023, arXiv 2305.10425; Liu et al. 2023, arXiv
      2309.06657): ``relu(1 - βh)``.
    - ``robust``: robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409),
      the debiased form ``[(1-ε)(-logσ(βh)) - ε(-logσ(-βh))] / (1-2ε)``; unbiased for labels
      flipped with probability ε.
    - ``bco_pair``: BCO (Jung et al. 2024, "Binary Classifier Optimization", arXiv
      2404.04656): ``-logσ(βa - δ) - logσ(-(βb - δ))`` with ``δ = bco_delta``. The paper's δ is
      a running mean of past rewards (the DPO method keeps it and passes it in, as TRL did up
      to 0.x); TRL 1.16 uses δ = 0, this function's default.
    - ``sppo_hard``: SPPO with hard labels (Wu et al. 2024, "Self-Play Preference
      Optimization", arXiv 2405.00675): ``(a - 1/(2β))² + (b + 1/(2β))²``.
    - ``nca_pair``: NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv 2402.05369):
      ``-logσ(βa) - ½ logσ(-βa) - ½ logσ(-βb)``.
    - ``apo_zero``: APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization",
      arXiv 2408.06266): ``(1 - σ(βa)) + σ(βb)``; raises chosen and lowers rejected likelihood.
    - ``apo_down``: APO-down (same paper): ``σ(βa) + (1 - σ(β(a - b)))``; lowers both while
      widening the gap, for when the chosen outputs are worse than the current policy's.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps: ``(batch,)`` summed reference log-probs.
        beta: temperature β > 0; smaller β lets the policy move further from the reference.
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: ε in ``[0, 0.5)``, used by ``sigmoid`` and ``robust``.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts; required by
            ``ipo``.
        bco_delta: the reward offset δ of ``bco_pair`` (a float or a detached scalar tensor).

    Returns:
        :class:`PreferenceLoss`: ``losses`` ``(batch,)``; ``chosen_rewards = β a`` and
        ``rejected_rewards = β b`` detached (length-normalised for ``ipo``).
    """
    _check_loss_type(loss_type, DPO_LOSS_TYPES, "dpo_loss")
    _check_label_smoothing(label_smoothing)
    _check_beta(beta)
    a = chosen_logps - ref_chosen_logps
    b = rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, "loss_type='ipo'")
        a = a / chosen_len
        b = b / rejected_len
    h = a - b
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "ipo":
        # IPO regresses the margin to a finite target instead of pushing it to infinity.
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        chosen_r, rejected_r = beta * a, beta * b
        losses = -F.logsigmoid(chosen_r - bco_delta) - F.logsigmoid(-(rejected_r - bco_delta))
    elif loss_type == "sppo_hard":
        # Hard labels: the winner's target win-probability is 1, the loser's 0, so the
        # log-ratios are regressed to +1/(2β) and -1/(2β).
        losses = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    elif loss_type == "nca_pair":
        chosen_r, rejected_r = beta * a, beta * b
        losses = -F.logsigmoid(chosen_r) - 0.5 * F.logsigmoid(-chosen_r) - 0.5 * F.logsigmoid(-rejected_r)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    else:  # apo_down
        losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * h))

    return PreferenceLoss(losses, (beta * a).detach(), (beta * b).detach())


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO: reference-free preference loss on length-normalised log-probs.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv 2405.14734. With ``γ = gamma_beta_ratio · β``:

        h = β (πc/|c| - πr/|r|) - γ
        loss = -(1-ε) logσ(h) - ε logσ(-h)

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts.
        beta: reward scale β > 0 (the paper uses 2.0-2.5).
        gamma_beta_ratio: target margin γ expressed as a fraction of β (the paper's γ/β).
        label_smoothing: ε in ``[0, 0.5)``.

    Returns:
        :class:`PreferenceLoss` with rewards ``β πc/|c|`` and ``β πr/|r|`` detached.
    """
    _check_label_smoothing(label_smoothing)
    _check_beta(beta)
    chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, "simpo_loss")
    chosen_r = beta * chosen_logps / chosen_len
    rejected_r = beta * rejected_logps / rejected_len
    h = chosen_r - rejected_r - gamma_beta_ratio * beta
    return PreferenceLoss(_smoothed_sigmoid_loss(h, label_smoothing), chosen_r.detach(), rejected_r.detach())


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """CPO: reference-free preference loss plus a behaviour-cloning NLL on the chosen response.

    Xu et al. 2024, "Contrastive Preference Optimization", arXiv 2401.08417. CPO-SimPO
    combines it with SimPO's length normalisation and margin (Meng et al. 2024, arXiv
    2405.14734). With ``h = πc - πr`` (log-probs, no reference model):

    - ``sigmoid``: ``-(1-ε) logσ(βh) - ε logσ(-βh)``
    - ``hinge``: ``relu(1 - βh)``
    - ``ipo``: ``(h' - 1/(2β))²`` with ``h' = πc/|c| - πr/|r|`` (length-normalised as in IPO
      and TRL; needs lengths)
    - ``simpo``: ``-(1-ε) logσ(β h' - γ) - ε logσ(-(β h' - γ))`` with ``γ = simpo_gamma``
      (needs lengths)

    and to each ``+ α · chosen_nll``.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        chosen_nll: ``(batch,)`` NLL of the chosen completion, the mean over its tokens of
            ``-log p(token)``.
        beta: β > 0.
        alpha: weight α of the NLL term.
        loss_type: one of ``CPO_LOSS_TYPES``.
        chosen_lengths, rejected_lengths: ``(batch,)`` token counts, required by ``ipo`` and
            ``simpo``.
        simpo_gamma: margin γ of ``simpo`` (absolute, not divided by β).
        label_smoothing: ε in ``[0, 0.5)``, used by ``sigmoid`` and ``simpo``.

    Returns:
        :class:`PreferenceLoss` with rewards ``β πc``, ``β πr`` detached (``β πc/|c|``,
        ``β πr/|r|`` for ``ipo`` and ``simpo``).
    """
    _check_loss_type(loss_type, CPO_LOSS_TYPES, "cpo_loss")
    _check_label_smoothing(label_smoothing)
    _check_beta(beta)
    chosen, rejected = chosen_logps, rejected_logps
    if loss_type in ("ipo", "simpo"):
        chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, f"loss_type={loss_type!r}")
        chosen = chosen / chosen_len
        rejected = rejected / rejected_len
    h = chosen - rejected
    if loss_type == "sigmoid":
        pref = _smoothed_sigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        pref = (h - 1 / (2 * beta)) ** 2
    else:  # simpo
        pref = _smoothed_sigmoid_loss(beta * h - simpo_gamma, label_smoothing)
    losses = pref + alpha * chosen_nll
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` far from it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO: SFT on the chosen completion plus an odds-ratio penalty, no reference model.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv
    2403.07691 (eqs. 4-7). With length-normalised log-probs ``pc = πc/|c|``, ``pr = πr/|r|`` and
    ``odds(p) = P/(1-P)``:

        log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr))
        loss = -pc - β logσ(log_odds)

    ``-pc`` is the NLL of the chosen completion (mean over its tokens); β is the paper's λ.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts.
        beta: weight λ of the odds-ratio term (the paper uses 0.1 to 1.0).

    Returns:
        :class:`PreferenceLoss` with rewards ``β pc`` and ``β pr`` detached (as TRL logs them).
    """
    _check_beta(beta)
    chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, "orpo_loss")
    # A completion of probability 1 has infinite odds; keep the mean log-prob strictly below 0.
    chosen = (chosen_logps / chosen_len).clamp(max=-1e-6)
    rejected = (rejected_logps / rejected_len).clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())
