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

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

from lit_rlhf.errors import InvalidArgument

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "CPOLossType",
    "DPOLossType",
    "FDivergence",
    "PreferenceLoss",
    "check_beta",
    "check_label_smoothing",
    "check_loss_type",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "length_desensitized_logps",
    "orpo_loss",
    "simpo_loss",
    "wpo_weights",
]

# Each set of allowed names is written once, as the Literal a method's signature takes (so
# LightningCLI checks a config against it); the tuple the checks and messages use is read from it.
DPOLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "exo_pair",
    "aot", "aot_unpaired", "discopop", "sigmoid_norm", "sft",
]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = get_args(FDivergence)
# The loss types built on the chosen-minus-rejected score difference, where an f-divergence's
# f'(policy/reference) can replace the log-ratio (Wang et al. 2023; TRL 1.16 allows the same set).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
CPOLossType = Literal["sigmoid", "hinge", "ipo", "simpo"]
CPO_LOSS_TYPES: tuple[str, ...] = get_args(CPOLossType)


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


def check_label_smoothing(label_smoothing: float, where: str = "") -> None:
    """Refuse ε outside [0, 0.5): at 0.5 the conservative loss no longer depends on which completion
    was preferred, and the robust loss divides by 1 - 2ε = 0. ``where`` prefixes the message."""
    if not 0.0 <= label_smoothing < 0.5:
        raise InvalidArgument("label_smoothing", f"{where}{': ' if where else ''}label_smoothing must be in [0, 0.5), "
                              f"got {label_smoothing}.")


def check_beta(beta: float, where: str = "") -> None:
    """Refuse β <= 0 (the implicit reward scale). ``where`` prefixes the message."""
    if beta <= 0:
        raise InvalidArgument("beta", f"{where}{': ' if where else ''}beta must be > 0, got {beta}.")


def check_loss_type(loss_type: str, valid: tuple[str, ...], where: str) -> None:
    """Refuse a loss type outside ``valid``, naming the valid ones."""
    if loss_type not in valid:
        raise InvalidArgument("loss_type", f"{where}: unknown loss_type {loss_type!r}; valid names are "
                              f"{', '.join(valid)}.")


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


def f_divergence_scores(log_ratio: torch.Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> torch.Tensor:
    """``f'(u)`` at ``u = π/π_ref = exp(log_ratio)``: the score an f-divergence-regularised DPO
    compares in place of the log-ratio (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct
    Preference Optimization with Diverse Divergence Constraints", arXiv 2309.16240, Table 1).

    - ``reverse_kl``: ``log u`` (standard DPO);
    - ``forward_kl``: ``1 - 1/u``;
    - ``js_divergence``: ``log(2u/(1+u)) = log 2 + logσ(log u)``;
    - ``alpha_divergence``: ``(u^(α-1) - 1)/(α - 1)`` with ``α = f_alpha`` (``log u`` at α = 1);
      the exponent is clamped at 80 so ``exp`` stays finite in float32 (as TRL).

    Args:
        log_ratio: ``(batch,)`` ``log π - log π_ref``.
        f_divergence: one of ``F_DIVERGENCES``.
        f_alpha: α of ``alpha_divergence``.
    """
    if f_divergence == "reverse_kl":
        return log_ratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return log_ratio
        exponent = torch.clamp((f_alpha - 1.0) * log_ratio, max=80.0)
        return (torch.exp(exponent) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; valid names are {', '.join(F_DIVERGENCES)}")


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
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO and its variants that compare policy and reference log-ratios.

    With ``a = πc - refc``, ``b = πr - refr`` (chosen and rejected log-ratios) and
    ``h = a - b``; under an ``f_divergence`` other than ``reverse_kl``, ``a`` and ``b`` are
    first replaced by ``f'(e^a)`` and ``f'(e^b)`` (:func:`f_divergence_scores`) in the loss
    types of ``F_DIVERGENCE_LOSS_TYPES``; the others refuse it:

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
      ``β b/|r|`` (TRL 1.16 logs the plain ``β a``, ``β b``).
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
    - ``exo_pair``: EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language
      Model Alignment", arXiv 2402.00856, eq. 16): ``KL(q ‖ p)`` between the model's pair
      distribution ``q = (σ(βh), σ(-βh))`` and the smoothed label ``p = (1-ε, ε)``:
      ``σ(βh)(logσ(βh) - log(1-ε)) + σ(-βh)(logσ(-βh) - log ε)``. Needs ε > 0; ε = 0 means
      the paper's 1e-3 (as TRL recommends).
    - ``aot``: AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
      Optimal Transport", arXiv 2406.05882), paired: the batch's policy margins ``πc - πr``
      and reference margins ``refc - refr`` are each sorted, and the cDPO loss is applied to
      ``β(sorted_policy - sorted_reference)`` (first-order stochastic dominance over the batch).
    - ``aot_unpaired``: AOT unpaired: ``a`` and ``b`` are each sorted over the batch and the
      cDPO loss is applied to ``β(sorted a - sorted b)``. For both AOT forms the rows of
      ``losses`` are positions in sorted order, not the input pairs.
    - ``discopop``: DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization
      Algorithms with and for Large Language Models", arXiv 2406.08414, eq. 5), the
      log-ratio modulated loss: with ``z = βh`` and ``m = σ(z/τ)``, ``(1-m)(-logσ(z)) + m e^(-z)``,
      ``τ = discopop_tau``.
    - ``sigmoid_norm``: length-normalised DPO: ``-(1-ε) logσ(βh') - ε logσ(-βh')`` with
      ``h' = a/|c| - b/|r|`` (TRL 1.16's ``sigmoid_norm``, which ignores ε); needs lengths.
    - ``sft``: the NLL of the chosen completion, ``chosen_nll`` (mean over its tokens; TRL
      averages over the batch's tokens instead), the SFT term of a weighted mix (MPO, Wang et
      al. 2024, arXiv 2411.10442) and of RPO (Pang et al. 2024, arXiv 2404.19733).

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps: ``(batch,)`` summed reference log-probs.
        beta: temperature β > 0; smaller β lets the policy move further from the reference.
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: ε in ``[0, 0.5)``, used by ``sigmoid``, ``sigmoid_norm``, ``robust``,
            ``exo_pair``, ``aot`` and ``aot_unpaired``.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts; required by
            ``ipo`` and ``sigmoid_norm``.
        bco_delta: the reward offset δ of ``bco_pair`` (a float or a detached scalar tensor).
        discopop_tau: τ > 0 of ``discopop`` (the paper's 0.05).
        f_divergence: one of ``F_DIVERGENCES``.
        f_alpha: α of ``alpha_divergence``.
        chosen_nll: ``(batch,)`` mean NLL of the chosen completion, required by ``sft``.

    Returns:
        :class:`PreferenceLoss`: ``losses`` ``(batch,)``; ``chosen_rewards = β a`` and
        ``rejected_rewards = β b`` detached (length-normalised for ``ipo`` and ``sigmoid_norm``;
        ``a``, ``b`` the plain log-ratios whatever the f-divergence).
    """
    check_loss_type(loss_type, DPO_LOSS_TYPES, "dpo_loss")
    check_label_smoothing(label_smoothing)
    check_beta(beta)
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"dpo_loss: unknown f_divergence {f_divergence!r}; valid names are {', '.join(F_DIVERGENCES)}.")
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"dpo_loss: f_divergence={f_divergence!r} is undefined for loss_type={loss_type!r}; it applies to "
            f"{', '.join(F_DIVERGENCE_LOSS_TYPES)} (use reverse_kl with the others)."
        )
    if discopop_tau <= 0:
        raise ValueError(f"dpo_loss: discopop_tau must be > 0, got {discopop_tau}.")
    log_ratio_c = chosen_logps - ref_chosen_logps
    log_ratio_r = rejected_logps - ref_rejected_logps
    a = f_divergence_scores(log_ratio_c, f_divergence, f_alpha)
    b = f_divergence_scores(log_ratio_r, f_divergence, f_alpha)
    rewards_c, rewards_r = log_ratio_c, log_ratio_r
    if loss_type in ("ipo", "sigmoid_norm"):
        chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, f"loss_type={loss_type!r}")
        a, b = a / chosen_len, b / rejected_len
        rewards_c, rewards_r = log_ratio_c / chosen_len, log_ratio_r / rejected_len
    h = a - b
    eps = label_smoothing

    if loss_type in ("sigmoid", "sigmoid_norm"):
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
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * h))
    elif loss_type == "exo_pair":
        eps = eps or 1e-3
        z = beta * h
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    elif loss_type == "aot":
        policy_margins, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        ref_margins, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
        losses = _smoothed_sigmoid_loss(beta * (policy_margins - ref_margins), eps)
    elif loss_type == "aot_unpaired":
        sorted_a, _ = torch.sort(a, dim=0)
        sorted_b, _ = torch.sort(b, dim=0)
        losses = _smoothed_sigmoid_loss(beta * (sorted_a - sorted_b), eps)
    elif loss_type == "discopop":
        z = beta * h
        modulation = torch.sigmoid(z / discopop_tau)
        losses = (1 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)
    else:  # sft
        if chosen_nll is None:
            raise ValueError("dpo_loss: loss_type='sft' is the chosen completion's NLL; pass chosen_nll.")
        losses = chosen_nll

    return PreferenceLoss(losses, (beta * rewards_c).detach(), (beta * rewards_r).detach())


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
    check_label_smoothing(label_smoothing)
    check_beta(beta)
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
    alphapo_alpha: float = 0.0,
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

    and to each ``+ α · chosen_nll``. With ``alphapo_alpha = a ≠ 0`` (AlphaPO, Gupta et al. 2025,
    "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv 2501.03884) each log-prob ``ℓ``
    (length-normalised where the loss type normalises) is first reshaped into the reward
    ``(1 - e^(-a ℓ)) / a`` (``ℓ`` itself as ``a → 0``), and ``h`` is the difference of those.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        chosen_nll: ``(batch,)`` NLL of the chosen completion, the mean over its tokens of
            ``-log p(token)`` (so the batch's NLL is a mean of per-example means; TRL's CPO takes the
            mean over the batch's tokens).
        beta: β > 0.
        alpha: weight α of the NLL term.
        loss_type: one of ``CPO_LOSS_TYPES``.
        chosen_lengths, rejected_lengths: ``(batch,)`` token counts, required by ``ipo`` and
            ``simpo``.
        simpo_gamma: margin γ of ``simpo`` (absolute, not divided by β).
        label_smoothing: ε in ``[0, 0.5)``, used by ``sigmoid`` and ``simpo``.
        alphapo_alpha: AlphaPO's shape parameter ``a`` (TRL's CPO ``alpha``); 0 keeps log-probs.

    Returns:
        :class:`PreferenceLoss` with rewards ``β πc``, ``β πr`` detached (``β πc/|c|``,
        ``β πr/|r|`` for ``ipo`` and ``simpo``; AlphaPO's reshaped rewards times β when ``a ≠ 0``).
    """
    check_loss_type(loss_type, CPO_LOSS_TYPES, "cpo_loss")
    check_label_smoothing(label_smoothing)
    check_beta(beta)
    chosen, rejected = chosen_logps, rejected_logps
    if loss_type in ("ipo", "simpo"):
        chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, f"loss_type={loss_type!r}")
        chosen = chosen / chosen_len
        rejected = rejected / rejected_len
    if alphapo_alpha != 0.0:
        chosen = (1 - torch.exp(-alphapo_alpha * chosen)) / alphapo_alpha
        rejected = (1 - torch.exp(-alphapo_alpha * rejected)) / alphapo_alpha
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

    ``-pc`` is the NLL of the chosen completion (mean over its tokens), the paper's L_SFT; β is the
    paper's λ. TRL's ORPO takes its NLL over the prompt's tokens too, averaged over the batch's tokens.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed policy log-probs.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts.
        beta: weight λ of the odds-ratio term (the paper uses 0.1 to 1.0).

    Returns:
        :class:`PreferenceLoss` with rewards ``β pc`` and ``β pr`` detached (as TRL logs them).
    """
    check_beta(beta)
    chosen_len, rejected_len = _require_lengths(chosen_lengths, rejected_lengths, "orpo_loss")
    # A completion of probability 1 has infinite odds; keep the mean log-prob strictly below 0.
    chosen = (chosen_logps / chosen_len).clamp(max=-1e-6)
    rejected = (rejected_logps / rejected_len).clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def length_desensitized_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's log-probs (Liu et al. 2024, "Length Desensitization in Directed Preference
    Optimization", arXiv 2409.06411): the first ``ℓ = min(|c|, |r|)`` completion tokens of each
    pair count fully, the longer completion's excess ("verbose") tokens count ``α`` times:

        log p̂(y) = Σ_{t ≤ ℓ} log p(y_t) + α Σ_{t > ℓ} log p(y_t)

    Args:
        chosen_token_logps, rejected_token_logps: ``(batch, seq)`` per-token log-probs, 0 off the completion.
        chosen_mask, rejected_mask: ``(batch, seq)``, 1 on completion tokens.
        alpha: ``α`` in ``[0, 1]``; 1 is plain DPO, 0 ignores the excess tokens.

    Returns:
        ``(chosen, rejected)``, each ``(batch,)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"length_desensitized_logps: alpha must be in [0, 1], got {alpha}.")
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)).unsqueeze(1)

    def weighted(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = mask.long().cumsum(dim=1)  # 1, 2, ... along the completion tokens
        weight = torch.where(position <= shared, 1.0, alpha) * mask
        return (token_logps * weight).sum(dim=1)

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


@torch.no_grad()
def wpo_weights(
    chosen_token_logps: torch.Tensor,
    chosen_log_sum_sq: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_log_sum_sq: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> torch.Tensor:
    """WPO's weight of each pair (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv 2406.11827, eq. 2, with TRL's alignment): how likely the policy is to have
    sampled the pair itself, ``w = w(c) · w(r)`` with

        w(y) = exp( mean_t [ log p(y_t) - log Σ_v p(v | y_<t)² ] )

    detached (a weight, not a gradient path).

    Args:
        *_token_logps: ``(batch, seq)`` per-token log-probs, 0 off the completion.
        *_log_sum_sq: ``(batch, seq)`` ``log Σ_v p(v)²`` at the same positions.
        *_mask: ``(batch, seq)``, 1 on completion tokens.

    Returns:
        ``(batch,)``.
    """

    def weight(token_logps, log_sum_sq, mask):
        mask = mask.to(token_logps.dtype)
        aligned = ((token_logps - log_sum_sq) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return torch.exp(aligned)

    return weight(chosen_token_logps, chosen_log_sum_sq, chosen_mask) * weight(
        rejected_token_logps, rejected_log_sum_sq, rejected_mask
    )
