"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300),
with the DAPO and Dr. GRPO options.

Each ``training_step`` is one rollout of the shared online loop (``OnlineMethod``): a group of
``G = num_samples_per_prompt`` responses per prompt is sampled and scored, then

1. each response's advantage is its reward normalised within its group,
   ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (``lit_rlhf.losses.group_advantages``); with
   ``scale_rewards: batch`` divided by the std of the whole rollout (every rank's rows) instead, with ``none`` only
   centred, ``r_i - mean(r)`` (Dr. GRPO: dividing by the group's std over-weights groups that
   are almost all right or all wrong). ``true``/``false`` still mean ``group``/``none``. A group whose rewards are all
   equal gets advantage 0 and teaches nothing; the fraction of such prompts is logged as
   ``frac_reward_zero_std`` (binary rule-based rewards make it large when the task is too easy
   or too hard);
2. ``update_epochs`` (GRPO's μ) x ``num_mini_batches`` steps of ``lit_rlhf.losses.grpo_loss``: the clipped
   surrogate per token with ``epsilon`` and, above, ``epsilon_high`` (DAPO's clip-higher, Yu et
   al. 2025, arXiv 2503.14476), plus ``beta`` x the k3 estimate of KL(π ‖ π_ref) per token
   (``beta: 0`` drops the term and the reference forward with it), aggregated by ``loss_type``:

   - ``grpo``: mean over each response's tokens, then over responses (the GRPO paper);
     longer responses get less weight per token.
   - ``bnpo`` (also named ``token``): every token of the *micro-batch* weighted equally; each micro-batch is then
     weighted by its share of rows, so under gradient accumulation (or DDP) a token of a short
     micro-batch weighs more than one of a long micro-batch.
   - ``dapo``: every token of the *optimizer step* weighted equally, across micro-batches and
     ranks (the token count is all-reduced): DAPO's token-level loss (Yu et al. 2025, arXiv
     2503.14476), TRL's ``dapo``.
   - ``dr_grpo``: the token sum over ``batch x max_new_tokens``, a constant normaliser without
     the length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).
   - ``cispo``: CISPO's surrogate (MiniMax-M1, arXiv 2506.13585): every token's gradient flows,
     weighted by the detached ratio capped at ``epsilon_high``; aggregated as ``dapo``.

   Options on the surrogate: ``importance_sampling_level: sequence`` (GSPO, arXiv 2507.18071),
   ``delta`` (two-sided clipping, INTELLECT-2, arXiv 2505.07291), ``top_entropy_quantile``
   (only the highest-entropy tokens learn, arXiv 2506.01939), ``entropy_coef`` (entropy bonus),
   ``mask_truncated_completions`` (responses cut at ``max_new_tokens`` drop out of the loss,
   DAPO's overlong filtering).

Rewards are the online methods' reward sources; rule-based checkers (verifiable rewards) are
plain Python functions named ``module:function``, e.g. ``lit_rlhf.toy.rules:positive_check``.

Metrics (TRL's names): ``objective/scores`` (TRL ``reward``), ``reward_std``,
``frac_reward_zero_std``, ``objective/kl`` (mean k3 per token, TRL ``kl``), ``policy/clipfrac``
(TRL ``clip_ratio``), ``policy/approxkl``, ``loss/policy``, ``objective/entropy``. Where they mean other
things than TRL 1.16's (``benchmarks/agree_online.py`` compares them): ``reward_std`` is the mean of the groups'
stds (TRL: the std of the whole batch); ``objective/entropy`` is the sampled ``mean_i -Σ_t log π(y_t)`` (TRL's
``entropy``: the mean per-token entropy); ``policy/clipfrac`` is a fraction of tokens also with
``importance_sampling_level: sequence`` (TRL counts sequences there); ``frac_reward_zero_std`` counts flat groups
under every ``scale_rewards`` (TRL, under ``batch``: whether the whole batch is flat).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lit_rlhf.distributed import all_rows
from lit_rlhf.losses import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    GRPOLossType,
    ImportanceSamplingLevel,
    flat_groups,
    group_advantages,
    grpo_loss,
    masked_mean,
    resolve_scale_rewards,
)
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout, sampled_entropy
from lit_rlhf.rollout import Rollout


class GRPOTargets(NamedTuple):
    """What GRPO's loss reads of a rollout.

    Attributes:
        advantages: ``(B,)`` each response's group-relative advantage (0 for a flat group).
    """

    advantages: torch.Tensor


class GRPO(OnlineMethod):
    """Group Relative Policy Optimization on the shared online loop: advantages and loss only.

    Args:
        num_samples_per_prompt: ``G``, the group size (``>= 2``; the paper samples 64).
        epsilon: lower clip ε of the ratio.
        epsilon_high: upper clip of the ratio (DAPO's clip-higher, e.g. 0.28); ``None`` means
            ``epsilon``. With ``loss_type: cispo`` the cap on the ratio itself (e.g. 5.0), required.
        beta: coefficient of the k3 KL to the reference per token; 0 skips the reference forward.
        scale_rewards: ``group`` (GRPO), ``batch`` (the rollout's std) or ``none`` (Dr. GRPO);
            ``True``/``False`` are aliases of ``group``/``none``.
        eps: added to the std.
        loss_type: ``grpo``, ``bnpo`` (or ``token``), ``dapo``, ``dr_grpo`` or ``cispo`` (see the module docstring).
        importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO).
        delta: cap on the unclipped ratio (two-sided clipping), ``> 1 + epsilon_high``; ``None`` for none.
        mask_truncated_completions: leave responses without a stop token out of the loss.
        entropy_coef: weight of an entropy bonus (mean entropy of the learning tokens).
        top_entropy_quantile: fraction of highest-entropy tokens that keep a policy term (1 keeps all).
        **kwargs: rollout, update, optimizer and bank arguments of ``OnlineMethod``; ``router_aux_loss_coef``, the
            weight of a mixture of experts' router load-balancing loss (``OnlineMethod``; TRL's own).
    """

    adds_router_aux_loss = True

    def __init__(
        self,
        *,
        num_samples_per_prompt: int = 4,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        scale_rewards: Literal["group", "batch", "none"] | bool = "group",
        eps: float = 1e-4,
        loss_type: GRPOLossType = "grpo",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        delta: float | None = None,
        mask_truncated_completions: bool = False,
        entropy_coef: float = 0.0,
        top_entropy_quantile: float = 1.0,
        **kwargs,
    ):
        super().__init__(num_samples_per_prompt=num_samples_per_prompt, **kwargs)
        if num_samples_per_prompt < 2:
            raise ValueError(
                f"GRPO needs num_samples_per_prompt >= 2 (advantages are relative to the group), got {num_samples_per_prompt}"
            )
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {loss_type!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                             f"got {importance_sampling_level!r}")
        if loss_type == "cispo" and epsilon_high is None:
            raise ValueError("loss_type 'cispo' caps the ratio at epsilon_high: set it (the paper uses 5.0)")
        high = epsilon if epsilon_high is None else epsilon_high
        if delta is not None and delta <= 1 + high:
            raise ValueError(f"delta caps the unclipped ratio and must be > 1 + epsilon_high = {1 + high}, got {delta}")
        if not 0.0 <= top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high
        self.beta = beta
        self.scale_rewards = resolve_scale_rewards(scale_rewards)
        self.eps = eps
        self.loss_type = loss_type
        self.importance_sampling_level = importance_sampling_level
        self.delta = delta
        self.mask_truncated_completions = mask_truncated_completions
        self.entropy_coef = entropy_coef
        self.top_entropy_quantile = top_entropy_quantile

    def uses_reference(self) -> bool:
        return self.beta > 0

    def loss_entropy(self) -> str | None:
        # The bonus differentiates the entropy; the top-entropy mask only reads it.
        if self.entropy_coef > 0:
            return "gradient"
        return "metric" if self.top_entropy_quantile < 1 else None

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # dapo's and cispo's losses are already divided by the whole step's tokens: micro-batch losses just add up.
        return 1.0 if self.loss_type in ("dapo", "cispo") else super().accumulation_weight(batch)

    # -- advantages -----------------------------------------------------------------------------------

    def compute_advantages(self, scored: ScoredRollout) -> GRPOTargets:
        # The batch std is over the rollout of every rank, as one process holding it (and TRL) computes it.
        batch_std = all_rows(scored.scores).std() if self.scale_rewards == "batch" else None
        advantages, _ = group_advantages(scored.scores, self.num_samples_per_prompt, scale_rewards=self.scale_rewards,
                                         eps=self.eps, batch_std=batch_std)
        return GRPOTargets(advantages=advantages)

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        if not self.mask_truncated_completions:
            return rollout.response_mask
        # DAPO's overlong filtering: a response cut at max_new_tokens was not judged on what it meant to say.
        return rollout.response_mask * rollout.ended.unsqueeze(1).to(rollout.response_mask.dtype)

    def rollout_metrics(self, scored: ScoredRollout, targets: GRPOTargets) -> dict:
        k = self.num_samples_per_prompt
        return {
            **super().rollout_metrics(scored, targets),
            "frac_reward_zero_std": flat_groups(scored.scores, k).float().mean(),
            "reward_std": scored.scores.view(-1, k).std(dim=1).mean(),
            "objective/entropy": sampled_entropy(scored),
        }

    # -- the loss of one micro-batch ------------------------------------------------------------------

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = self.loss_mask(batch.rollout)
        out = self.policy_forward(batch.rollout, with_entropy=self.loss_entropy() is not None, taken=batch.taken)
        result = grpo_loss(out.logprobs, batch.old_logprobs, batch.targets.advantages, mask, epsilon=self.epsilon,
                           epsilon_high=self.epsilon_high, beta=self.beta, ref_logprobs=batch.ref_logprobs,
                           loss_type=self.loss_type, max_completion_length=self.sampling.max_new_tokens,
                           num_tokens=mask.sum() if batch.step_tokens is None else batch.step_tokens,
                           importance_sampling_level=self.importance_sampling_level, delta=self.delta,
                           entropy=out.entropy, entropy_coef=self.entropy_coef,
                           top_entropy_quantile=self.top_entropy_quantile)
        metrics = {
            "loss/policy": result.loss.detach(),
            "policy/clipfrac": result.clipfrac,
            "policy/approxkl": 0.5 * masked_mean((out.logprobs.detach() - batch.old_logprobs) ** 2, mask),
        }
        if batch.ref_logprobs is not None:
            metrics["objective/kl"] = result.kl
        return self.add_router_aux_loss(result.loss, out, batch, metrics), metrics
