"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792): DPO on pairs the policy samples inside the step.

Each ``training_step`` is one rollout of the shared online loop (``OnlineMethod``):

1. two responses are sampled per prompt from the current policy and scored by the configured
   reward sources (a reward adapter, a reward model, or a Python function: the online methods'
   ``rewards``);
2. the higher-scored response of each pair is ``chosen``, the other ``rejected``; a pair whose
   two scores are equal states no preference and gets weight 0 (its fraction is logged as
   ``frac_ties``);
3. ``update_epochs`` x ``num_mini_batches`` optimizer steps of ``lit_rlhf.losses.dpo_loss`` on the
   pairs (any DPO ``loss_type``), with the reference's log-probs taken at rollout time. The two
   responses of a prompt always stay in the same micro-batch.

Unlike TRL 1.16's OnlineDPOTrainer (by design): log-probs are taken at the sampling temperature, as in
every online method (TRL takes them at temperature 1); ``ipo`` uses length-normalised log-ratios, as the
offline DPO (TRL's Online DPO sums them); a tie weighs 0 (TRL makes the first response chosen).

Metrics (TRL's names): ``objective/scores``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``loss/dpo``,
``frac_ties``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.losses import DPO_LOSS_TYPES, check_beta, check_label_smoothing, check_loss_type, dpo_loss
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout


class PairTargets(NamedTuple):
    """How each pair ranks. Per row, so that the update can select rows: both rows of a pair carry
    the pair's values. ``(B,)`` each.

    Attributes:
        first_is_chosen: whether the pair's first response scored higher.
        pair_weight: 0 for a tie (no preference to learn), else 1.
    """

    first_is_chosen: torch.Tensor
    pair_weight: torch.Tensor


class OnlineDPO(OnlineMethod):
    """DPO on the policy's own samples, ranked by the reward sources, on the shared online loop.

    Args:
        beta: DPO's β, the strength of the implicit KL constraint to the reference.
        loss_type: any of ``lit_rlhf.losses.DPO_LOSS_TYPES`` (``sigmoid`` is DPO, ``ipo`` IPO, ...).
        label_smoothing: ε of ``sigmoid`` (cDPO) and ``robust``.
        update_epochs: passes over each rollout (TRL's Online DPO takes one).
        num_mini_batches: optimizer steps per pass.
        **kwargs: rollout, update, optimizer and bank arguments of ``OnlineMethod``
            (``num_samples_per_prompt`` is always 2).
    """

    rows_kept_together = 2

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        update_epochs: int = 1,
        num_mini_batches: int = 1,
        **kwargs,
    ):
        if kwargs.get("num_samples_per_prompt", 2) != 2:
            raise ValueError(f"OnlineDPO samples a pair per prompt: num_samples_per_prompt must be 2, got "
                             f"{kwargs['num_samples_per_prompt']}")
        kwargs["num_samples_per_prompt"] = 2
        super().__init__(update_epochs=update_epochs, num_mini_batches=num_mini_batches, **kwargs)
        check_loss_type(loss_type, DPO_LOSS_TYPES, "OnlineDPO")
        check_beta(beta, "OnlineDPO")
        check_label_smoothing(label_smoothing, "OnlineDPO")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    def uses_behaviour_logprobs(self) -> bool:
        # DPO's loss compares with the reference, never with the sampling policy: no behaviour forward.
        return False

    # -- rank each pair ------------------------------------------------------------------------------

    def compute_advantages(self, scored: ScoredRollout) -> PairTargets:
        pairs = scored.scores.view(-1, 2)
        first_wins = pairs[:, 0] > pairs[:, 1]
        tie = pairs[:, 0] == pairs[:, 1]
        return PairTargets(first_is_chosen=first_wins.repeat_interleave(2),
                           pair_weight=(~tie).float().repeat_interleave(2))

    def step_weights(self, scored: ScoredRollout, targets: PairTargets) -> torch.Tensor:
        # Half of a pair's weight on each of its two rows: the step's sum is its untied pairs.
        return (targets.pair_weight / 2).unsqueeze(1)

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # The loss is already divided by the whole step's untied pairs: micro-batch losses just add up.
        return 1.0

    def rollout_metrics(self, scored: ScoredRollout, targets: PairTargets) -> dict:
        return {**super().rollout_metrics(scored, targets), "frac_ties": (targets.pair_weight == 0).float().mean()}

    # -- the loss of one micro-batch of whole pairs --------------------------------------------------

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.rollout.response_mask
        logps = self.policy_forward(batch.rollout, taken=batch.taken).logprobs.sum(dim=1).view(-1, 2)
        ref_logps = batch.ref_logprobs.sum(dim=1).view(-1, 2)
        lengths = mask.sum(dim=1).view(-1, 2)
        first = batch.targets.first_is_chosen.view(-1, 2)[:, 0]
        weight = batch.targets.pair_weight.view(-1, 2)[:, 0]

        def chosen_rejected(pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.where(first, pair[:, 0], pair[:, 1]), torch.where(first, pair[:, 1], pair[:, 0])

        chosen, rejected = chosen_rejected(logps)
        ref_chosen, ref_rejected = chosen_rejected(ref_logps)
        chosen_len, rejected_len = chosen_rejected(lengths)
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                       label_smoothing=self.label_smoothing, chosen_lengths=chosen_len, rejected_lengths=rejected_len,
                       chosen_nll=-chosen / chosen_len.clamp(min=1))
        pairs = weight.sum().clamp(min=1)
        # The mean over the untied pairs of the optimizer step (every micro-batch, every rank), as one process
        # holding the step's pairs takes it: a per-rank mean would weigh a pair by 1 / its rank's untied pairs.
        step_pairs = pairs if batch.step_tokens is None else batch.step_tokens.clamp(min=1)
        loss = (out.losses * weight).sum() / step_pairs

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x.detach() * weight).sum() / pairs

        metrics = {
            "loss/dpo": mean(out.losses),
            "rewards/chosen": mean(out.chosen_rewards),
            "rewards/rejected": mean(out.rejected_rewards),
            "rewards/margins": mean(out.chosen_rewards - out.rejected_rewards),
            "rewards/accuracies": mean((out.chosen_rewards > out.rejected_rewards).float()),
            "logps/chosen": mean(chosen),
            "logps/rejected": mean(rejected),
        }
        return loss, metrics
