"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv
2402.14740; the estimator is Kool et al. 2019's).

Each ``training_step`` is one rollout of the shared online loop (``OnlineMethod``): ``k =
num_samples_per_prompt`` responses per prompt are sampled and scored, then

1. the KL to the reference, ``KL = Σ_t (log π(y_t) - log π_ref(y_t))`` per response, either folds
   into the sequence reward, ``R = score - β KL`` (``kl_in_reward``, as in the paper and TRL's
   RLOOTrainer), or becomes a loss term ``β · mean_t k3_t`` (the GRPO-style penalty);
2. each response's advantage is its reward minus the mean reward of the other ``k - 1``
   responses to the same prompt (``lit_rlhf.losses.rloo_advantages``), optionally whitened over
   the rollout (``normalize_advantages``);
3. ``update_epochs`` x ``num_mini_batches`` steps of the clipped surrogate (``ppo_policy_loss``) with
   that one advantage shared by every token of the response, the loss a token mean over the optimizer
   step. With ``update_epochs=1`` and ``num_mini_batches=1`` the ratio is 1 at the only step and this is
   REINFORCE-LOO, the paper's gradient divided by the rollout's mean response length. TRL 1.16's
   RLOOTrainer differs by design: one ratio per response, ``exp(Σ_t log π - Σ_t log π_old)``, clipped per
   response, mean over responses (so on-policy its gradient is ours times the mean length; off-policy its
   clipping acts on whole responses, ours on tokens); and it normalises advantages with ε = 1e-4 on the
   std where ``normalize_advantages`` puts 1e-8 on the variance.

No critic: the baseline comes from the other samples of the same prompt, so ``k >= 2``.

Metrics (TRL's names): ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
``objective/rlhf_reward``, ``objective/scores``, ``objective/kl_coef``, ``frac_reward_zero_std``,
``policy/clipfrac``, ``policy/approxkl``, ``policy/entropy``, ``loss/policy``, ``loss/kl`` (when
the KL is a loss term). ``objective/kl`` is the mean over responses of their summed KL, as TRL's earlier
RLOOTrainer logged it (TRL 1.16's ``kl`` is a mean per token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.distributed import global_whiten
from lit_rlhf.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    KL_PENALTY_KINDS,
    ImportanceSamplingLevel,
    KLPenaltyKind,
    flat_groups,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    rloo_advantages,
)
from lit_rlhf.methods.kl_control import AdaptiveKLController, kl_controller
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout, sampled_entropy


class RLOOTargets(NamedTuple):
    """What RLOO's loss reads of a rollout, and the reward its baseline was taken of.

    Attributes:
        advantages: ``(B,)`` leave-one-out advantage of each response (whitened with ``normalize_advantages``).
        rewards: ``(B,)`` the sequence reward ``R``: the score, minus ``β KL`` with ``kl_in_reward``.
    """

    advantages: torch.Tensor
    rewards: torch.Tensor


class RLOO(OnlineMethod):
    """REINFORCE leave-one-out on the shared online loop: advantages and loss only.

    Args:
        num_samples_per_prompt: ``k``, responses per prompt (``>= 2``; the paper uses 2 to 4).
        kl_coef: β of the KL to the reference (0 disables it and skips the reference forward).
        kl_in_reward: fold ``β · KL`` into each response's reward (sequence level, the paper's
            choice); ``False`` adds ``β · k3`` per token to the loss instead.
        kl_estimator: the per-token KL estimate summed into the reward when ``kl_in_reward``:
            ``k1`` (``log π - log π_ref``, the paper's), ``k3`` (always >= 0), or ``k2`` / ``abs``. The loss term
            always uses ``k3`` (unbiased for the gradient of KL as a loss, as in GRPO).
        adaptive_kl: steer β towards ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed.
        kl_target: target KL per sequence (nats) of the adaptive controller.
        kl_horizon: horizon (in samples) of the adaptive controller.
        normalize_advantages: whiten the advantages over the rollout (mean 0, std 1).
        cliprange: ε of the clipped surrogate.
        epsilon_high: upper clip of the ratio (DAPO's clip-higher); ``None`` means ``cliprange``.
        importance_sampling_level: ``token`` ratios, or one ``sequence`` ratio per response, the
            geometric mean of its token ratios (GSPO, arXiv 2507.18071).
        **kwargs: rollout, update, optimizer and bank arguments of ``OnlineMethod``; ``router_aux_loss_coef``, the
            weight of a mixture of experts' router load-balancing loss (``OnlineMethod``; TRL's own).
    """

    adds_router_aux_loss = True

    def __init__(
        self,
        *,
        num_samples_per_prompt: int = 4,
        kl_coef: float = 0.05,
        kl_in_reward: bool = True,
        kl_estimator: KLPenaltyKind = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        normalize_advantages: bool = False,
        cliprange: float = 0.2,
        epsilon_high: float | None = None,
        importance_sampling_level: ImportanceSamplingLevel = "token",
        **kwargs,
    ):
        super().__init__(num_samples_per_prompt=num_samples_per_prompt, **kwargs)
        if num_samples_per_prompt < 2:
            raise ValueError(
                f"RLOO needs num_samples_per_prompt >= 2 (the baseline is the other samples of the same prompt), "
                f"got {num_samples_per_prompt}"
            )
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in KL_PENALTY_KINDS:
            raise ValueError(f"kl_estimator must be one of {KL_PENALTY_KINDS}, got {kl_estimator!r}")
        self.kl_controller = kl_controller(kl_coef, adaptive=adaptive_kl, target=kl_target, horizon=kl_horizon)
        self.kl_in_reward = kl_in_reward
        self.kl_estimator = kl_estimator
        self.normalize_advantages = normalize_advantages
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                             f"got {importance_sampling_level!r}")
        self.cliprange = cliprange
        self.epsilon_high = epsilon_high
        self.importance_sampling_level = importance_sampling_level

    def uses_reference(self) -> bool:
        return self.kl_controller.value > 0 or isinstance(self.kl_controller, AdaptiveKLController)

    # -- advantages -----------------------------------------------------------------------------------

    def compute_advantages(self, scored: ScoredRollout) -> RLOOTargets:
        rewards = scored.scores
        if self.kl_in_reward and scored.ref_logprobs is not None:
            rewards = scored.scores - self.kl_controller.value * self.sequence_kl(scored)
        advantages = rloo_advantages(rewards, self.num_samples_per_prompt)
        if self.normalize_advantages:
            # One advantage per response: whiten over responses, not tokens.
            advantages = global_whiten(advantages, torch.ones_like(advantages))
        return RLOOTargets(advantages=advantages, rewards=rewards)

    def rollout_metrics(self, scored: ScoredRollout, targets: RLOOTargets) -> dict:
        metrics = {**super().rollout_metrics(scored, targets), "objective/kl_coef": self.kl_controller.value}
        if scored.ref_logprobs is not None:
            kl = self.sequence_kl(scored)
            metrics["objective/kl"] = kl.mean()
            if self.kl_in_reward:
                metrics["objective/non_score_reward"] = (-self.kl_controller.value * kl).mean()
        metrics.update({
            "objective/rlhf_reward": targets.rewards.mean(),
            "objective/entropy": sampled_entropy(scored),
            "frac_reward_zero_std": flat_groups(targets.rewards, self.num_samples_per_prompt).float().mean(),
        })
        return metrics

    # -- the loss of one micro-batch ------------------------------------------------------------------

    def loss_entropy(self) -> str:
        return "metric"  # policy/entropy

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # The losses are already divided by the whole step's tokens: micro-batch losses just add up.
        return 1.0

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.rollout.response_mask
        out = self.policy_forward(batch.rollout, with_entropy=True, taken=batch.taken)
        # Token means over the whole optimizer step (every micro-batch, every rank), as one process
        # holding the step's rows in one micro-batch would take them.
        num_tokens = mask.sum() if batch.step_tokens is None else batch.step_tokens
        policy = ppo_policy_loss(out.logprobs, batch.old_logprobs, batch.targets.advantages, mask,
                                 clip_range=self.cliprange, clip_range_high=self.epsilon_high,
                                 importance_sampling_level=self.importance_sampling_level, num_tokens=num_tokens)
        loss = policy.loss
        metrics = {
            "loss/policy": policy.loss.detach(),
            "policy/clipfrac": policy.clipfrac,
            "policy/approxkl": policy.approxkl,
            "policy/entropy": masked_mean(out.entropy, mask).detach(),
        }
        if not self.kl_in_reward and batch.ref_logprobs is not None:
            kl_loss = (kl_penalty(out.logprobs, batch.ref_logprobs, kind="k3") * mask).sum() / num_tokens
            loss = loss + self.kl_controller.value * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        return self.add_router_aux_loss(loss, out, batch, metrics), metrics
