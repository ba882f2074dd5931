"""PPO for language models (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020, arXiv
2009.01325; implementation details after Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO", arXiv 2403.17031).

Each ``training_step`` takes a batch of prompts and:

1. samples responses from the policy adapter and scores them (``OnlineMethod.rollout_and_score``);
2. takes the behaviour and reference log-probs and the critic's values ``V_t`` at rollout time;
3. builds per-token rewards: ``r_t = -β KL_t`` with ``KL_t = log π(y_t) - log π_ref(y_t)``, plus
   the score on the last response token;
4. GAE advantages and returns (gamma, lam), advantages whitened over the rollout; then β moves
   when the KL controller is adaptive;
5. ``update_epochs`` passes over ``num_mini_batches`` mini-batches with the clipped policy loss and
   ``vf_coef`` x the clipped value loss, both token means over the whole optimizer step: every
   micro-batch and every rank divides its token sum by the step's all-reduced token count, so
   gradient accumulation and DDP give the loss of one micro-batch holding the step's rows (TRL
   averages per-micro-batch token means instead, which weighs a token of a short micro-batch more).

Critic: a ``value`` adapter with a value head (its own LoRA, a second forward), or
``critic: shared``, a value head on the policy's own trunk (one forward gives logits and values).

Metric names follow TRL's PPOTrainer, except its ``val/*`` critic metrics, renamed because
Lightning's validation metrics own the ``val/`` prefix:

| lit_rlhf | TRL |
|---|---|
| ``objective/kl``, ``objective/entropy``, ``objective/scores``, ``objective/rlhf_reward``, ``objective/non_score_reward`` | same |
| ``policy/clipfrac``, ``policy/approxkl``, ``policy/entropy`` | ``policy/clipfrac_avg``, ``policy/approxkl_avg``, ``policy/entropy_avg`` |
| ``value/clipfrac``, ``value/vpred``, ``value/error`` | ``val/clipfrac_avg``, ``val/vpred``, ``val/error`` |
| ``value/explained_variance`` | (none) |
| ``loss/policy``, ``loss/value`` | ``loss/policy_avg``, ``loss/value_avg`` |
| ``objective/kl_coef`` | (``beta`` of the controller) |
| ``response_length``, ``rollout/count``, ``rollout/episodes``, ``lr`` | ``episode``, ``lr`` |
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lit_rlhf.distributed import global_whiten
from lit_rlhf.losses import (
    KL_PENALTY_KINDS,
    KLPenaltyKind,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
)
from lit_rlhf.methods.kl_control import kl_controller
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout, sampled_entropy
from lit_rlhf.models import AdapterSpec
from lit_rlhf.rollout import Rollout


class PPOTargets(NamedTuple):
    """What PPO's loss reads of a rollout. All ``(B, T)`` float32, 0 on padding.

    Attributes:
        advantages: GAE advantages, whitened over the rollout.
        returns: the value targets, ``advantages + values`` before whitening.
        values: the critic's values at rollout time (the clipped value loss's anchor).
        kl: per-token KL estimate to the reference (``kl_estimator``).
    """

    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor


class PPO(OnlineMethod):
    """Proximal Policy Optimization from a reward signal, with a KL penalty to the reference.

    Args:
        kl_coef: β, the per-token KL penalty coefficient (the initial β when adaptive).
        adaptive_kl: steer β towards ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed.
        kl_target: target KL per sequence (nats) of the adaptive controller.
        kl_horizon: horizon (in samples) of the adaptive controller.
        kl_estimator: per-token KL estimate in the reward, ``k1`` (``log π - log π_ref``, as in
            Ziegler et al.), ``k3`` (always >= 0), or ``k2`` / ``abs``.
        gamma: discount γ of GAE.
        lam: λ of GAE.
        cliprange: ε of the clipped policy objective.
        cliprange_value: ε of the clipped value loss.
        vf_coef: weight of the value loss.
        whiten_rewards: scale the per-token rewards to unit variance before GAE.
        critic: ``adapter`` (a separate value adapter + value head) or ``shared`` (a value head
            on the policy adapter: one forward; the saved policy adapter then carries that head
            in ``head.safetensors`` beside the PEFT files, which still load as an LM adapter).
        value_adapter: the critic's adapter name when ``critic: adapter``.
        **kwargs: rollout (``rewards``, ``sampling``, ``engine``, ``num_samples_per_prompt``, reward
            clipping and EOS rules), update (``update_epochs``, ``num_mini_batches``,
            ``gradient_accumulation_steps``, ``max_grad_norm``), logging, optimizer and bank arguments
            of ``OnlineMethod`` and ``BankMethod``.
    """

    def __init__(
        self,
        *,
        kl_coef: float = 0.05,
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        kl_estimator: KLPenaltyKind = "k1",
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        whiten_rewards: bool = False,
        critic: Literal["adapter", "shared"] = "adapter",
        value_adapter: str = "value",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if critic not in ("adapter", "shared"):
            raise ValueError(f"critic must be 'adapter' or 'shared', got {critic!r}")
        if kl_estimator not in KL_PENALTY_KINDS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_PENALTY_KINDS)}, got {kl_estimator!r}")
        if critic == "adapter" and self.bank_spec.train_mode == "full":
            # Full mode trains the base weights themselves: there is no LoRA for a separate critic.
            raise ValueError("critic 'adapter' needs LoRA adapters, and train_mode 'full' has none: use critic: shared "
                             "(a value head on the policy's trunk) or train_mode: lora")
        self.kl_controller = kl_controller(kl_coef, adaptive=adaptive_kl, target=kl_target, horizon=kl_horizon)
        self.kl_estimator = kl_estimator
        self.gamma = gamma
        self.lam = lam
        self.cliprange = cliprange
        self.cliprange_value = cliprange_value
        self.vf_coef = vf_coef
        self.whiten_rewards = whiten_rewards
        self.critic = critic
        self.value_adapter = value_adapter

    # -- the bank: policy, critic, (reward) ----------------------------------------------------------

    def required_adapters(self) -> list[AdapterSpec]:
        adapters = super().required_adapters()
        if self.critic == "shared":
            return [AdapterSpec(a.name, head="value") if a.name == self.policy_adapter else a for a in adapters]
        return adapters + [AdapterSpec(self.value_adapter, head="value")]

    def policy_logits_and_values(self, rollout: Rollout):
        if self.critic == "shared":
            return self.bank.logits_and_values(rollout.input_ids, rollout.attention_mask, adapter=self.policy_adapter,
                                               position_ids=rollout.position_ids,
                                               logits_to_keep=self.logits_to_keep(rollout))
        return super().policy_logits_and_values(rollout)

    def fuses_policy_head(self) -> bool:
        # The shared critic reads the trunk of the policy's own forward, which keeps its logits.
        return self.critic != "shared" and super().fuses_policy_head()

    def runs_shared_prompts(self) -> bool:
        # That forward runs whole rows (bank.logits_and_values), so the reference's does too.
        return self.critic != "shared" and super().runs_shared_prompts()

    def loss_entropy(self) -> str:
        return "metric"  # policy/entropy

    def critic_values(self, rollout: Rollout) -> torch.Tensor | None:
        """``(b, T)`` values of the separate value adapter at the positions predicting each response token."""
        if self.critic == "shared":
            return None  # the policy's forward gives them
        values = self.bank.values(rollout.input_ids, rollout.attention_mask, adapter=self.value_adapter,
                                  position_ids=rollout.position_ids)
        return self.response_slice(values, rollout)

    # -- advantages -----------------------------------------------------------------------------------

    def compute_advantages(self, scored: ScoredRollout) -> PPOTargets:
        mask = scored.rollout.response_mask
        kl = kl_penalty(scored.old_logprobs, scored.ref_logprobs, kind=self.kl_estimator) * mask
        rewards = self.token_rewards(scored, kl)
        if self.whiten_rewards:
            rewards = global_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, scored.old_values, mask, gamma=self.gamma, lam=self.lam)
        return PPOTargets(advantages=global_whiten(advantages, mask), returns=returns, values=scored.old_values, kl=kl)

    def token_rewards(self, scored: ScoredRollout, kl: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: ``-β KL_t`` on every token, plus the score on the response's last token (its
        stop token when it has one): the score rewards the whole response. TRL's PPOTrainer (0.x) put the
        score one position after an ended response's last token, on padding its critic also valued, and with
        pad == EOS left the EOS out of the response; here neither (``benchmarks/agree_online.py``)."""
        rewards = -self.kl_controller.value * kl
        rows = torch.arange(rewards.shape[0], device=rewards.device)
        rewards[rows, scored.rollout.response_lengths - 1] += scored.scores
        return rewards

    def rollout_metrics(self, scored: ScoredRollout, targets: PPOTargets) -> dict:
        mask = scored.rollout.response_mask
        beta = self.kl_controller.value
        non_score_reward = (-beta * targets.kl).sum(dim=1)
        residual_var = masked_var(targets.returns - targets.values, mask)
        return {
            **super().rollout_metrics(scored, targets),
            "objective/kl": targets.kl.sum(dim=1).mean(),
            "objective/entropy": sampled_entropy(scored),
            "objective/non_score_reward": non_score_reward.mean(),
            "objective/rlhf_reward": (scored.scores + non_score_reward).mean(),
            "objective/kl_coef": beta,
            "value/explained_variance": 1.0 - residual_var / masked_var(targets.returns, mask).clamp(min=1e-8),
        }

    # -- the loss of one micro-batch ---------------------------------------------------------------------

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # The losses are already divided by the whole step's tokens: micro-batch losses just add up.
        return 1.0

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rollout, mask = batch.rollout, batch.rollout.response_mask
        out = self.policy_forward(rollout, with_entropy=True, taken=batch.taken)
        values = out.values if self.critic == "shared" else self.critic_values(rollout)
        num_tokens = mask.sum() if batch.step_tokens is None else batch.step_tokens
        policy = ppo_policy_loss(out.logprobs, batch.old_logprobs, batch.targets.advantages, mask,
                                 clip_range=self.cliprange, num_tokens=num_tokens)
        value = ppo_value_loss(values, batch.targets.values, batch.targets.returns, mask,
                               clip_range_value=self.cliprange_value, num_tokens=num_tokens)
        loss = policy.loss + self.vf_coef * value.loss
        with torch.no_grad():
            metrics = {
                "loss/policy": policy.loss.detach(),
                "loss/value": value.loss.detach(),
                "policy/clipfrac": policy.clipfrac,
                "policy/approxkl": policy.approxkl,
                "policy/entropy": masked_mean(out.entropy, mask),
                "value/clipfrac": value.clipfrac,
                "value/vpred": masked_mean(values, mask),
                "value/error": masked_mean((values - batch.targets.returns) ** 2, mask),
            }
        return loss, metrics
