"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300),
with the DAPO and Dr. GRPO options.

Each ``training_step`` is one rollout of the shared online loop (``OnlineMethod``): a group of
``G = num_samples_per_prompt`` responses per prompt is sampled and scored, then

1. each response's advantage is its reward normalised within its group,
   ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (``lit_rlhf.losses.group_advantages``), or only
   centred, ``r_i - mean(r)``, with ``scale_rewards: false`` (Dr. GRPO: dividing by the std
   over-weights groups that are almost all right or all wrong). A group whose rewards are all
   equal gets advantage 0 and teaches nothing; the fraction of such prompts is logged as
   ``frac_reward_zero_std`` (binary rule-based rewards make it large when the task is too easy
   or too hard);
2. ``ppo_epochs`` x ``num_mini_batches`` steps of ``lit_rlhf.losses.grpo_loss``: the clipped
   surrogate per token with ``epsilon`` and, above, ``epsilon_high`` (DAPO's clip-higher, Yu et
   al. 2025, arXiv 2503.14476), plus ``beta`` x the k3 estimate of KL(π ‖ π_ref) per token
   (``beta: 0`` drops the term and the reference forward with it), aggregated by ``loss_type``:

   - ``grpo``: mean over each response's tokens, then over responses (the GRPO paper);
     longer responses get less weight per token.
   - ``bnpo``: every token of the *micro-batch* weighted equally; each micro-batch is then
     weighted by its share of rows, so under gradient accumulation (or DDP) a token of a short
     micro-batch weighs more than one of a long micro-batch.
   - ``dapo``: every token of the *optimizer step* weighted equally, across micro-batches and
     ranks (the token count is all-reduced): DAPO's token-level loss (Yu et al. 2025, arXiv
     2503.14476), TRL's ``dapo``.
   - ``dr_grpo``: the token sum over ``batch x max_new_tokens``, a constant normaliser without
     the length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).

Rewards are the online methods' reward sources; rule-based checkers (verifiable rewards) are
plain Python functions named ``module:function``, e.g. ``lit_rlhf.toy.rules:positive_check``.

Metrics (TRL's names): ``objective/scores`` (TRL ``reward``), ``reward_std``,
``frac_reward_zero_std``, ``objective/kl`` (mean k3 per token, TRL ``kl``), ``policy/clipfrac``
(TRL ``clip_ratio``), ``policy/approxkl``, ``loss/policy``, ``objective/entropy``.
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf.losses import GRPO_LOSS_TYPES, group_advantages, grpo_loss, masked_mean
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout


class GRPO(OnlineMethod):
    """Group Relative Policy Optimization on the shared online loop: advantages and loss only.

    Args:
        num_samples_per_prompt: ``G``, the group size (``>= 2``; the paper samples 64).
        epsilon: lower clip ε of the ratio.
        epsilon_high: upper clip of the ratio (DAPO's clip-higher, e.g. 0.28); ``None`` means ``epsilon``.
        beta: coefficient of the k3 KL to the reference per token; 0 skips the reference forward.
        scale_rewards: divide the centred rewards by the group's std (GRPO); ``False`` only
            centres them (Dr. GRPO).
        eps: added to the group std.
        loss_type: token aggregation: ``grpo``, ``bnpo``, ``dapo`` or ``dr_grpo`` (see the module docstring).
        **kwargs: rollout, update, optimizer and bank arguments of ``OnlineMethod``.
    """

    def __init__(
        self,
        *,
        num_samples_per_prompt: int = 4,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        scale_rewards: bool = True,
        eps: float = 1e-4,
        loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "grpo",
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
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high
        self.beta = beta
        self.scale_rewards = scale_rewards
        self.eps = eps
        self.loss_type = loss_type

    def uses_reference(self) -> bool:
        return self.beta > 0

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # dapo's loss is already divided by the whole step's tokens: micro-batch losses just add up.
        return 1.0 if self.loss_type == "dapo" else super().accumulation_weight(batch)

    # -- advantages -----------------------------------------------------------------------------------

    def compute_advantages(self, scored: ScoredRollout) -> dict[str, torch.Tensor]:
        k = self.num_samples_per_prompt
        advantages, zero_std = group_advantages(scored.scores, k, scale_rewards=self.scale_rewards, eps=self.eps)
        mask = scored.rollout.response_mask
        self.log_rollout_metrics(
            {
                "frac_reward_zero_std": zero_std.float().mean(),
                "reward_std": scored.scores.view(-1, k).std(dim=1).mean(),
                "objective/entropy": (-scored.old_logprobs * mask).sum(dim=1).mean(),
            },
            batch_size=scored.scores.shape[0],
        )
        return {"advantages": advantages}

    # -- the loss of one micro-batch ------------------------------------------------------------------

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.rollout.response_mask
        out = self.policy_forward(batch.rollout)
        result = grpo_loss(out.logprobs, batch.old_logprobs, batch.data["advantages"], mask, epsilon=self.epsilon,
                           epsilon_high=self.epsilon_high, beta=self.beta, ref_logprobs=batch.ref_logprobs,
                           loss_type=self.loss_type, max_completion_length=self.sampling.max_new_tokens,
                           num_tokens=mask.sum() if batch.step_tokens is None else batch.step_tokens)
        metrics = {
            "loss/policy": result.loss.detach(),
            "policy/clipfrac": result.clipfrac,
            "policy/approxkl": 0.5 * masked_mean((out.logprobs.detach() - batch.old_logprobs) ** 2, mask),
        }
        if batch.ref_logprobs is not None:
            metrics["objective/kl"] = result.kl
        return result.loss, metrics
