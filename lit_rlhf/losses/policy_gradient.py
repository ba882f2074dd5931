"""Policy-gradient losses and advantage estimators: PPO, RLOO, GRPO (and DAPO, Dr. GRPO).

Token-level tensors are ``(batch, seq)`` over the *response* tokens; ``mask`` is ``(batch,
seq)`` with 1 on response tokens and 0 on padding. Padded positions never affect a result:
they are replaced by 0 before any sum, so even ``nan`` / ``-inf`` there is harmless.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

__all__ = [
    "GRPO_LOSS_TYPES",
    "GRPOLossType",
    "IMPORTANCE_SAMPLING_LEVELS",
    "ImportanceSamplingLevel",
    "KLPenaltyKind",
    "KL_PENALTY_KINDS",
    "SCALE_REWARDS",
    "Advantages",
    "GRPOLoss",
    "GroupAdvantages",
    "PolicyLoss",
    "ValueLoss",
    "flat_groups",
    "gae_advantages",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "importance_log_ratio",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "ppo_policy_loss",
    "ppo_value_loss",
    "resolve_scale_rewards",
    "rloo_advantages",
    "whiten",
]

# The allowed values: each Literal is the one source (a method's signature, so LightningCLI checks
# it too), its tuple the runtime check.
KLPenaltyKind = Literal["k1", "k2", "k3", "abs"]
KL_PENALTY_KINDS = get_args(KLPenaltyKind)
#: ``token`` is another name of ``bnpo``.
GRPOLossType = Literal["grpo", "bnpo", "token", "dapo", "dr_grpo", "cispo"]
GRPO_LOSS_TYPES = get_args(GRPOLossType)
ImportanceSamplingLevel = Literal["token", "sequence"]
IMPORTANCE_SAMPLING_LEVELS = get_args(ImportanceSamplingLevel)
SCALE_REWARDS = ("group", "batch", "none")


class Advantages(NamedTuple):
    """GAE output. Both ``(batch, seq)``, detached, 0 where ``mask`` is 0.

    Attributes:
        advantages: ``A_t``.
        returns: ``A_t + V_t``, the value-function targets.
    """

    advantages: torch.Tensor
    returns: torch.Tensor


class PolicyLoss(NamedTuple):
    """PPO policy loss. All scalars.

    Attributes:
        loss: differentiable clipped-surrogate loss.
        clipfrac: fraction of response tokens where the clipped branch is taken, detached
            (``policy/clipfrac``).
        approxkl: ``½ mean((logp - old_logp)²)``, detached (``policy/approxkl``).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor


class ValueLoss(NamedTuple):
    """PPO value loss. Scalars: ``loss`` (differentiable), ``clipfrac`` (detached; PPO logs it as
    ``value/clipfrac``)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


class GroupAdvantages(NamedTuple):
    """Group-normalised advantages.

    Attributes:
        advantages: ``(num_prompts * k,)``.
        zero_std: ``(num_prompts,)`` bool, True where every reward of the group is equal (the
            group carries no learning signal; log ``zero_std.float().mean()``).
    """

    advantages: torch.Tensor
    zero_std: torch.Tensor


class GRPOLoss(NamedTuple):
    """GRPO loss. All scalars.

    Attributes:
        loss: differentiable loss.
        clipfrac: fraction of response tokens where the clipped branch is taken, detached (a fraction of
            tokens also with sequence-level ratios, where TRL counts sequences).
        kl: mean per-token k3 KL to the reference, detached (0 when no ``ref_logprobs``).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    kl: torch.Tensor


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where (not multiply) so that nan/inf in padding cannot leak through 0 * inf.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    ``sum(x · mask) / sum(mask)`` over ``dim`` (all elements when ``None``). An all-zero mask
    gives 0 rather than nan, so an empty micro-batch cannot put nan into the weights.

    Args:
        x: any shape, e.g. ``(batch, seq)``.
        mask: same shape as ``x``, 0/1 (bool, int or float).
        dim: dimension to reduce, or ``None`` for all.
    """
    mask = mask.to(x.dtype)
    total = (_zero_masked(x, mask) * mask).sum() if dim is None else (_zero_masked(x, mask) * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=torch.finfo(x.dtype).tiny)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """``sum(x · mask) / num_tokens``: a token mean whose normaliser may span more than ``x``, e.g. the
    tokens of a whole optimizer step (every micro-batch, every rank); ``masked_mean`` when ``None``."""
    if num_tokens is None:
        return masked_mean(x, mask)
    mask = mask.to(x.dtype)
    count = torch.as_tensor(num_tokens, dtype=x.dtype, device=x.device)
    return (_zero_masked(x, mask) * mask).sum() / count.clamp(min=torch.finfo(x.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over positions where ``mask`` is 1 (scalar).

    ``var = sum(mask · (x - mean)²) / (n - 1)`` when ``unbiased`` (Bessel), else ``/ n``, with
    ``n = sum(mask)`` and ``mean`` the masked mean. With ``n <= 1`` the result is 0 instead of
    nan or an error (TRL raises; we avoid a host sync on the mask sum).

    Args:
        x: ``(batch, seq)`` (any shape).
        mask: same shape, 0/1.
        unbiased: apply Bessel's correction.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked elements.

    ``(x - mean) / sqrt(var + eps)`` with :func:`masked_mean` and unbiased :func:`masked_var`;
    with ``shift_mean=False`` the mean is added back (only the scale changes, as for PPO
    rewards whose sign matters). Padded positions are returned as 0 and do not influence
    the statistics.

    Args:
        x: ``(batch, seq)``.
        mask: ``(batch, seq)``, 0/1.
        shift_mean: keep the result centred at 0 (True) or at the original mean (False).
        eps: added to the variance.

    Returns:
        ``(batch, seq)``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from sampled tokens' log-probs.

    With ``d = logp - ref`` (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html):

    - ``k1``: ``d``, unbiased, can be negative per token (the PPO-RLHF reward penalty of
      Ziegler et al. 2019, arXiv 1909.08593, and Stiennon et al. 2020, arXiv 2009.01325)
    - ``k2``: ``½ d²``, biased, always >= 0
    - ``k3``: ``exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1``, unbiased and >= 0
      (GRPO's KL term)
    - ``abs``: ``|d|``

    Args:
        logprobs, ref_logprobs: ``(batch, seq)`` log-probs of the sampled tokens.
        kind: one of ``KL_PENALTY_KINDS``.

    Returns:
        ``(batch, seq)``; mask it yourself.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.exp(-d) + d - 1
    if kind == "abs":
        return d.abs()
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; valid kinds are {', '.join(KL_PENALTY_KINDS)}.")


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Advantages:
    """Generalised advantage estimation.

    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", arXiv 1506.02438:

        δ_t = r_t + γ V_{t+1} - V_t
        A_t = δ_t + γλ A_{t+1}
        R_t = A_t + V_t

    over the tokens where ``mask`` is 1; ``t+1`` means the next *unmasked* token, and after
    the last one ``V = 0`` and ``A = 0`` (the episode ends). Right padding is the usual case;
    masked tokens inside a response (e.g. tool output) are skipped the same way. Computed
    without gradient: advantages and returns are targets.

    Args:
        rewards: ``(batch, seq)`` per-token rewards (e.g. score on the last token minus a
            per-token KL penalty).
        values: ``(batch, seq)`` critic values ``V_t``.
        mask: ``(batch, seq)``, 1 on response tokens.
        gamma: discount γ.
        lam: GAE λ; 1 gives Monte-Carlo returns minus values, 0 gives one-step TD.

    Returns:
        :class:`Advantages`, both ``(batch, seq)``, 0 where ``mask`` is 0.
    """
    valid = mask.bool()
    rewards = rewards.float()
    values = values.float()
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        keep = valid[:, t]
        advantages[:, t] = torch.where(keep, adv_t, torch.zeros_like(adv_t))
        # Masked steps are skipped: the carried value and advantage pass through them.
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, adv_t, next_adv)
    returns = _zero_masked(advantages + values, valid)
    return Advantages(advantages, returns)


def importance_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """``log ρ``: per token ``logp_t - old_logp_t`` (``(batch, seq)``), or per sequence the mean of
    those over the sequence's tokens (``(batch, 1)``, GSPO: Zheng et al. 2025, "Group Sequence
    Policy Optimization", arXiv 2507.18071, eq. 7, a length-normalised sequence likelihood ratio).
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_mean(log_ratio, mask, dim=1).unsqueeze(-1)
    raise ValueError(f"unknown importance_sampling_level {level!r}; valid values are {', '.join(IMPORTANCE_SAMPLING_LEVELS)}.")


def _clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    *,
    mask: torch.Tensor | None = None,
    level: str = "token",
    delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped objective (as a loss) and where its clipped branch is taken."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # one advantage per sequence, shared by its tokens
    log_ratio = logprobs - old_logprobs if mask is None else importance_log_ratio(logprobs, old_logprobs, mask, level)
    ratio = torch.exp(log_ratio)
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    if delta is not None:
        # Two-sided clipping (INTELLECT-2, arXiv 2505.07291): the unclipped branch is capped at δ too,
        # so a negative advantage cannot push an already large ratio arbitrarily far.
        ratio = torch.clamp(ratio, max=delta)
    unclipped = -advantages * ratio
    # The max of the two losses is the pessimistic (lower) bound of PPO's objective.
    per_token = torch.maximum(unclipped, clipped).expand_as(logprobs)
    return per_token, (clipped > unclipped).expand_as(logprobs)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    importance_sampling_level: str = "token",
    num_tokens: float | torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO clipped-surrogate policy loss.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347. With
    ``ρ_t = exp(logp_t - old_logp_t)``:

        loss = Σ_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε, 1 + ε_high)) / N

over the masked tokens, ``N`` = ``num_tokens`` (the tokens of the whole optimizer step, so
that micro-batches and ranks add up to the step's token mean) or this call's tokens when ``None``.

    ``ε_high`` defaults to ``ε``; a larger one is DAPO's clip-higher (arXiv 2503.14476). With
    ``importance_sampling_level="sequence"`` every token of a sequence shares the sequence-level
    ratio ``ρ = exp(mean_t(logp_t - old_logp_t))`` (GSPO, arXiv 2507.18071).

    Args:
        logprobs: ``(batch, seq)`` current policy log-probs of the sampled tokens.
        old_logprobs: ``(batch, seq)`` log-probs at rollout time.
        advantages: ``(batch, seq)``, or ``(batch,)`` broadcast over each sequence's tokens.
        mask: ``(batch, seq)``, 1 on response tokens.
        clip_range: ε.
        clip_range_high: ``ε_high``; ``None`` means ``ε``.
        importance_sampling_level: ``token`` or ``sequence``.
        num_tokens: ``N``; ``None`` for the masked tokens of this call.

    Returns:
        :class:`PolicyLoss` of scalars (``clipfrac`` and ``approxkl`` over this call's tokens).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    per_token, clipped = _clipped_surrogate(logprobs, old_logprobs, advantages, clip_range, high, mask=mask,
                                            level=importance_sampling_level)
    loss = _token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean(clipped.float(), mask)
        approxkl = 0.5 * masked_mean((logprobs - old_logprobs).float() ** 2, mask)
    return PolicyLoss(loss, clipfrac, approxkl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> ValueLoss:
    """PPO clipped value loss.

    As in OpenAI baselines / TRL:

        v_clip = clip(v, old - ε_v, old + ε_v)
        loss = ½ Σ_t max((v - R)², (v_clip - R)²) / N

over the masked tokens, ``N`` as in :func:`ppo_policy_loss`.

    Args:
        values: ``(batch, seq)`` current critic values.
        old_values: ``(batch, seq)`` values at rollout time.
        returns: ``(batch, seq)`` targets (:class:`Advantages` ``.returns``).
        mask: ``(batch, seq)``, 1 on response tokens.
        clip_range_value: ``ε_v``.
        num_tokens: ``N``; ``None`` for the masked tokens of this call.

    Returns:
        :class:`ValueLoss` of scalars.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLoss(loss, clipfrac)


def _grouped(rewards: torch.Tensor, k: int, where: str) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % k != 0:
        raise ValueError(
            f"{where}: rewards must be (num_prompts * k,) with each prompt's k completions consecutive; "
            f"got shape {tuple(rewards.shape)} with k={k}."
        )
    return rewards.view(-1, k)


def flat_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``(num_prompts,)`` bool, True where every reward of a prompt's group is equal: a group-relative
    baseline then leaves no learning signal (logged as ``frac_reward_zero_std``).

    Args:
        rewards: ``(num_prompts * k,)``; prompt ``p`` owns rows ``p*k .. p*k + k - 1``.
        k: completions per prompt.
    """
    grouped = _grouped(rewards, k, "flat_groups")
    return (grouped == grouped[:, :1]).all(dim=1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", arXiv 2402.14740 (after Kool et al. 2019):

        A_i = r_i - (1/(k-1)) Σ_{j≠i} r_j

    Args:
        rewards: ``(num_prompts * k,)``; prompt ``p`` owns rows ``p*k .. p*k + k - 1``.
        k: completions per prompt, ``>= 2`` (a single sample has no other to compare to).

    Returns:
        ``(num_prompts * k,)`` advantages.
    """
    if k < 2:
        raise ValueError(
            f"rloo_advantages needs k >= 2 completions per prompt for a leave-one-out baseline, got k={k}."
        )
    grouped = _grouped(rewards, k, "rloo_advantages")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def resolve_scale_rewards(scale_rewards: bool | str) -> str:
    """``scale_rewards`` as one of ``SCALE_REWARDS``; the booleans of earlier configs are aliases:
    ``True`` is ``group``, ``False`` is ``none`` (as in TRL)."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true = group, false = none), "
                         f"got {scale_rewards!r}")
    return scale_rewards


def group_advantages(
    rewards: torch.Tensor, k: int, *, scale_rewards: bool | str = "group", eps: float = 1e-4,
    batch_std: torch.Tensor | None = None,
) -> GroupAdvantages:
    """Group-relative advantages of GRPO.

    Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300:

        A_i = (r_i - mean(group)) / (std(group) + eps)     scale_rewards = group (True)
        A_i = (r_i - mean(group)) / (std(batch) + eps)     scale_rewards = batch (Hu et al. 2025,
                                                           REINFORCE++, arXiv 2501.03262; TRL's "batch")
        A_i =  r_i - mean(group)                           scale_rewards = none (False; Dr. GRPO,
                                                           arXiv 2503.20783)

    ``std`` is unbiased (``/(n-1)``) as in GRPO and TRL. A group whose rewards are all equal
    gets advantages exactly 0 (not float noise, never nan), including ``k == 1``.

    Args:
        rewards: ``(num_prompts * k,)``; prompt ``p`` owns rows ``p*k .. p*k + k - 1``.
        k: completions per prompt, ``>= 1``.
        scale_rewards: ``group``, ``batch`` or ``none`` (``True``/``False`` are ``group``/``none``).
        eps: added to the standard deviation.
        batch_std: ``std(batch)`` of ``scale_rewards = batch`` when the batch is more than ``rewards``
            (the rollout of every data-parallel rank); ``None``: the std of ``rewards``.

    Returns:
        :class:`GroupAdvantages`.
    """
    if k < 1:
        raise ValueError(f"group_advantages needs k >= 1, got k={k}.")
    scale = resolve_scale_rewards(scale_rewards)
    grouped = _grouped(rewards, k, "group_advantages")
    mean = grouped.mean(dim=1, keepdim=True)
    centred = grouped - mean
    zero_std = flat_groups(rewards, k)
    # Manual unbiased std: torch.std gives nan (and a warning) for a single element.
    if scale == "group":
        centred = centred / (torch.sqrt((centred**2).sum(dim=1, keepdim=True) / max(k - 1, 1)) + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = torch.sqrt(((grouped - grouped.mean()) ** 2).sum() / max(grouped.numel() - 1, 1))
        centred = centred / (batch_std + eps)
    advantages = torch.where(zero_std[:, None], torch.zeros_like(centred), centred)
    return GroupAdvantages(advantages.reshape(-1), zero_std)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The response tokens whose entropy is in the top ``quantile`` of this batch's tokens
    ("Beyond the 80/20 Rule", Wang et al. 2025, arXiv 2506.01939; their ρ = 0.2): tokens with
    entropy ``>=`` the ``1 - quantile`` quantile of the masked entropies (of this call, so of one rank
    under DDP, where TRL gathers every rank's). ``quantile = 1`` keeps every token, ``0`` only the
    highest. ``(batch, seq)`` bool, False on padding."""
    valid = mask.bool()
    values = entropy.detach()[valid].float()
    if values.numel() == 0:
        return valid
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy.detach() >= threshold) & valid


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
) -> GRPOLoss:
    """GRPO policy loss with its surrogate and token-aggregation variants.

    Per token (Shao et al. 2024, arXiv 2402.03300), with ``ρ_t = exp(logp_t - old_logp_t)``:

        ℓ_t = max(-A min(ρ_t, δ), -A clip(ρ_t, 1 - ε, 1 + ε_high)) + β · k3_t
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    ``δ = delta`` is INTELLECT-2's two-sided clipping (arXiv 2505.07291; ``None``: no cap). With
    ``importance_sampling_level="sequence"``, ``ρ`` is the sequence's
    ``exp(mean_t(logp_t - old_logp_t))`` shared by its tokens (GSPO, arXiv 2507.18071). With
    ``top_entropy_quantile = q < 1`` only the tokens in the top ``q`` of entropy keep a policy
    term (:func:`high_entropy_mask`, arXiv 2506.01939; the KL term keeps every token). With
    ``entropy_coef = c``, ``- c · mean_t H_t`` over the same tokens is added (an entropy bonus,
    a mean whatever the aggregation, as TRL; for ``dapo`` and ``cispo``, whose micro-batch losses add up over the
    step, the mean is weighted by this call's share of ``num_tokens``, so the step's bonus is one mean, not one per
    micro-batch).

    ``loss_type`` picks the aggregation (and, for ``cispo``, the surrogate):

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (GRPO paper);
      longer sequences get less weight per token.
    - ``bnpo`` / ``token``: ``Σ ℓ_t / Σ mask`` over the tokens *of this call* (one micro-batch
      on one rank). Every token of the micro-batch weighs the same, but under gradient
      accumulation or DDP micro-batches with fewer tokens weigh more per token: this is not
      DAPO's loss unless the optimizer step is one micro-batch on one rank.
    - ``dapo``: ``Σ ℓ_t / num_tokens`` with ``num_tokens`` the response tokens of the whole
      optimizer step (all micro-batches, all ranks; divided by the number of ranks, since DDP
      averages gradients over ranks): every token of the step weighs the same, DAPO's
      token-level loss (Yu et al. 2025, arXiv 2503.14476; TRL's ``dapo``, except that with several
      optimizer steps per rollout TRL divides each by the steps' mean token count, not by its own).
      The caller sums the micro-batch losses without reweighting them.
    - ``dr_grpo``: ``Σ ℓ_t / (batch · max_completion_length)``, a constant normaliser that
      removes the length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training",
      arXiv 2503.20783); needs ``max_completion_length``.
    - ``cispo``: CISPO (MiniMax-M1, arXiv 2506.13585; ScaleRL, arXiv 2510.13786): no clipped
      branch; the gradient of every token flows through ``logp_t`` weighted by the clipped,
      detached ratio, ``ℓ_t = -sg(min(ρ_t, ε_high)) A log p_t``, aggregated as ``dapo``.
      ``epsilon_high`` is the cap ``ε_max`` itself here (the paper's 5.0 is typical), required.

    Args:
        logprobs, old_logprobs: ``(batch, seq)`` current and rollout-time log-probs.
        advantages: ``(batch,)`` (one per completion) or ``(batch, seq)``.
        mask: ``(batch, seq)``, 1 on completion tokens that enter the loss.
        epsilon: lower clip ε.
        epsilon_high: upper clip ``ε_high``; ``None`` means ``ε``. For ``cispo``, the cap on ρ.
        beta: KL coefficient β; when > 0, ``ref_logprobs`` is required.
        ref_logprobs: ``(batch, seq)`` reference log-probs; if given, ``kl`` is reported even
            with ``beta == 0``.
        loss_type: one of ``GRPO_LOSS_TYPES``.
        max_completion_length: generation length limit, required by ``dr_grpo``.
        num_tokens: the optimizer step's response tokens per rank, required by ``dapo`` and ``cispo``.
        importance_sampling_level: ``token`` or ``sequence``.
        delta: cap δ > 1 + ε_high of the unclipped ratio, or ``None``.
        entropy: ``(batch, seq)`` policy entropy per token, required when ``entropy_coef`` > 0 or
            ``top_entropy_quantile`` < 1.
        entropy_coef: weight of the entropy bonus.
        top_entropy_quantile: fraction ``q`` in ``[0, 1]`` of highest-entropy tokens kept.

    Returns:
        :class:`GRPOLoss` of scalars.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; valid names are {', '.join(GRPO_LOSS_TYPES)}.")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"grpo_loss: beta={beta} > 0 adds a KL penalty to the reference; pass ref_logprobs.")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_loss: loss_type='dr_grpo' normalises by batch * max_completion_length; pass it.")
    if loss_type in ("dapo", "cispo") and num_tokens is None:
        raise ValueError(f"grpo_loss: loss_type={loss_type!r} normalises by the optimizer step's response tokens; "
                         "pass num_tokens.")
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError("grpo_loss: loss_type='cispo' caps the ratio at epsilon_high (e.g. 5.0); pass it.")
    if (entropy_coef > 0 or top_entropy_quantile < 1.0) and entropy is None:
        raise ValueError("grpo_loss: entropy_coef and top_entropy_quantile need the per-token entropy; pass entropy.")
    mask_f = mask.to(logprobs.dtype)
    if loss_type == "cispo":
        ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling_level))
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        per_token = -(torch.clamp(ratio, max=epsilon_high).detach() * adv * logprobs)
        clipped = (ratio > epsilon_high).expand_as(logprobs)
    else:
        high = epsilon if epsilon_high is None else epsilon_high
        per_token, clipped = _clipped_surrogate(logprobs, old_logprobs, advantages, epsilon, high, mask=mask,
                                                level=importance_sampling_level, delta=delta)
    policy_mask = mask_f
    if top_entropy_quantile < 1.0:
        policy_mask = high_entropy_mask(entropy, mask, top_entropy_quantile).to(per_token.dtype)
        per_token = per_token * policy_mask
    per_token_kl = None
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, ref_logprobs, kind="k3")
        if beta > 0:
            per_token = per_token + beta * per_token_kl

    masked = _zero_masked(per_token, mask_f)
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask_f.sum(dim=1).clamp(min=1)
        loss = per_sequence.mean()
    elif loss_type in ("bnpo", "token"):
        loss = masked.sum() / mask_f.sum().clamp(min=1)
    elif loss_type in ("dapo", "cispo"):
        loss = masked.sum() / torch.as_tensor(num_tokens, dtype=masked.dtype, device=masked.device).clamp(min=1)
    else:  # dr_grpo
        loss = masked.sum() / (per_token.size(0) * max_completion_length)
    if entropy_coef > 0:
        bonus = masked_mean(entropy, policy_mask)
        if loss_type in ("dapo", "cispo"):
            # These micro-batch losses add up unweighted over the step: weigh the bonus by this call's share of the
            # step's tokens, or accumulation would count it once per micro-batch.
            step_tokens = torch.as_tensor(num_tokens, dtype=bonus.dtype, device=bonus.device).clamp(min=1)
            bonus = bonus * mask_f.sum() / step_tokens
        loss = loss - entropy_coef * bonus

    with torch.no_grad():
        clipfrac = masked_mean(clipped.float(), mask)
        if per_token_kl is None:
            kl = torch.zeros((), dtype=torch.float32, device=logprobs.device)
        else:
            kl = masked_mean(per_token_kl.float(), mask)
    return GRPOLoss(loss, clipfrac, kl)
