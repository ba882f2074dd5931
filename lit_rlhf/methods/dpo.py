"""Offline preference optimisation: DPO and its family, SimPO, CPO (and CPO-SimPO), ORPO.

Every step runs ONE forward over chosen and rejected rows together (the collator stacks
them), takes the log-probs of the completion tokens only, and hands per-sequence sums to
the pure losses of ``lit_rlhf.losses.preference``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lit_rlhf.losses import cpo_loss, dpo_loss, orpo_loss, sequence_logps, simpo_loss
from lit_rlhf.methods.base import BankMethod

DPOLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
]


class PairLogps(NamedTuple):
    """Per-sequence completion log-probs of a preference batch; every field is (batch,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


class PreferenceMethod(BankMethod):
    """Shared forward, steps and metrics of the pairwise preference methods.

    A subclass defines ``compute_loss(batch) -> (scalar loss, metrics dict)`` with its loss.
    """

    def pair_logps(self, batch: dict) -> PairLogps:
        """Log-probs of chosen and rejected completions from one forward of the active role."""
        logits = self.bank(batch["input_ids"], batch["attention_mask"]).logits
        logps, lengths = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        half = logps.shape[0] // 2
        return PairLogps(logps[:half], logps[half:], lengths[:half], lengths[half:])

    def policy_pair_logps(self, batch: dict) -> PairLogps:
        with self.bank.role(self.trained_adapter):
            return self.pair_logps(batch)

    @staticmethod
    def pair_metrics(policy: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
        }

    def training_step(self, batch: dict, batch_idx: int):
        loss, metrics = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0] // 2
        self.log("loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("rewards/accuracies", metrics.pop("rewards/accuracies"), prog_bar=True, batch_size=batch_size)
        self.log_dict(metrics, batch_size=batch_size)
        return self.finite_or_none(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=batch_size, sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0] // 2
        self.log("test/loss", loss, batch_size=batch_size, sync_dist=True)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=batch_size, sync_dist=True)


class DPO(PreferenceMethod):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its loss family.

    Args:
        beta: strength of the implicit KL constraint to the reference policy.
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, ``bco_pair``, ``sppo_hard``,
            ``nca_pair``, ``apo_zero``, ``apo_down``.
        label_smoothing: probability that a preference label is flipped (``sigmoid`` as cDPO, which
            TRL 1.16 ignores there; ``robust``).
        reference_free: compare against a uniform reference (log-prob 0) instead of a model.
        precompute_ref_logps: compute the reference log-probs of every training and validation
            row once before training, so the reference never runs again (and, in ``full`` mode, no
            frozen copy of the base is kept).
        policy_adapter: the adapter trained as the policy.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        precompute_ref_logps: bool = False,
        policy_adapter: str = "policy",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.precompute_ref_logps = precompute_ref_logps
        self.policy_adapter = policy_adapter
        self._ref_cache: dict[str, torch.Tensor] | None = None
        # bco_pair's δ (Jung et al. 2024): the running mean of the batch-mean implicit rewards seen in training.
        self._bco_reward_sum = 0.0
        self._bco_batches = 0

    def needs_frozen_reference(self) -> bool:
        return not (self.reference_free or self.precompute_ref_logps)

    # -- reference log-probs computed once ------------------------------------------------------

    def on_fit_start(self) -> None:
        if not self.precompute_ref_logps:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_examples"):
            raise RuntimeError("precompute_ref_logps needs a lit_rlhf preference DataModule passed to Trainer.fit")
        if self._ref_cache is None:
            if self.global_step > 0:
                raise RuntimeError("resuming with precompute_ref_logps needs the reference log-probs in the checkpoint")
            self._ref_cache = {
                split: self._reference_of(getattr(datamodule, f"{split}_examples"), datamodule.collator)
                for split in ("train", "val")
            }
        for split, values in self._ref_cache.items():
            examples = getattr(datamodule, f"{split}_examples")
            if len(examples) != values.shape[0]:
                raise RuntimeError(f"precomputed reference log-probs cover {values.shape[0]} {split} rows, the data has {len(examples)}")
            for example, (chosen, rejected) in zip(examples, values.tolist()):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected

    @torch.no_grad()
    def _reference_of(self, examples: list[dict], collator, batch_size: int = 32) -> torch.Tensor:
        """(rows, 2) reference log-probs of chosen and rejected, before any training step."""
        out = []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(self.device) for k, v in collator(examples[start : start + batch_size]).items()}
            if self.bank.has_reference:
                with self.bank.reference():
                    logps = self.pair_logps(batch)
            else:  # full mode without a frozen copy: the policy before its first step is the reference
                logps = self.policy_pair_logps(batch)
            out.append(torch.stack([logps.chosen, logps.rejected], dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._ref_cache is not None:
            checkpoint["ref_logps"] = self._ref_cache
        checkpoint["bco_running_mean"] = (self._bco_reward_sum, self._bco_batches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._ref_cache = checkpoint.get("ref_logps")
        self._bco_reward_sum, self._bco_batches = checkpoint.get("bco_running_mean", (0.0, 0))

    def bco_delta(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
        """δ of ``bco_pair``: the running mean of batch-mean rewards, this training batch included (the
        mean over every rank's batch under DDP); validation reads it without updating it."""
        if self._trainer is not None and self.trainer.training:
            batch_mean = torch.cat([chosen_rewards, rejected_rewards]).mean().detach()
            if self.trainer.world_size > 1:
                batch_mean = self.trainer.strategy.reduce(batch_mean, reduce_op="mean")
            self._bco_reward_sum += float(batch_mean)
            self._bco_batches += 1
        return self._bco_reward_sum / max(self._bco_batches, 1)

    def reference_pair_logps(self, batch: dict) -> PairLogps:
        if "ref_chosen_logps" in batch:
            return PairLogps(batch["ref_chosen_logps"], batch["ref_rejected_logps"], None, None)
        if self.reference_free:
            zeros = torch.zeros(batch["input_ids"].shape[0] // 2, device=self.device)
            return PairLogps(zeros, zeros, None, None)
        with self.bank.reference():
            return self.pair_logps(batch)

    def compute_loss(self, batch: dict):
        reference = self.reference_pair_logps(batch)
        policy = self.policy_pair_logps(batch)
        bco_delta = 0.0
        if self.loss_type == "bco_pair":
            bco_delta = self.bco_delta(self.beta * (policy.chosen - reference.chosen),
                                       self.beta * (policy.rejected - reference.rejected))
        out = dpo_loss(
            policy.chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
            bco_delta=bco_delta,
        )
        return out.losses.mean(), self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)


class SimPO(PreferenceMethod):
    """Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734): no reference model.

    Args:
        beta: reward scale of the length-normalised log-probs.
        gamma_beta_ratio: target margin gamma as a fraction of beta.
        label_smoothing: probability that a preference label is flipped.
        policy_adapter: the adapter trained as the policy.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    def __init__(
        self,
        *,
        beta: float = 2.0,
        gamma_beta_ratio: float = 0.5,
        label_smoothing: float = 0.0,
        policy_adapter: str = "policy",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta = beta
        self.gamma_beta_ratio = gamma_beta_ratio
        self.label_smoothing = label_smoothing
        self.policy_adapter = policy_adapter

    def compute_loss(self, batch: dict):
        policy = self.policy_pair_logps(batch)
        out = simpo_loss(
            policy.chosen,
            policy.rejected,
            policy.chosen_lengths,
            policy.rejected_lengths,
            beta=self.beta,
            gamma_beta_ratio=self.gamma_beta_ratio,
            label_smoothing=self.label_smoothing,
        )
        return out.losses.mean(), self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)


class CPO(PreferenceMethod):
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417): preference loss plus
    a behaviour-cloning NLL on the chosen completion, no reference model. ``loss_type: simpo``
    gives CPO-SimPO (length-normalised, with margin ``simpo_gamma``).

    Args:
        beta: reward scale.
        alpha: weight of the NLL term on chosen completions.
        loss_type: ``sigmoid``, ``hinge``, ``ipo`` or ``simpo``.
        simpo_gamma: target margin of ``simpo``.
        label_smoothing: probability that a preference label is flipped.
        policy_adapter: the adapter trained as the policy.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        alpha: float = 1.0,
        loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = "sigmoid",
        simpo_gamma: float = 0.5,
        label_smoothing: float = 0.0,
        policy_adapter: str = "policy",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta = beta
        self.alpha = alpha
        self.loss_type = loss_type
        self.simpo_gamma = simpo_gamma
        self.label_smoothing = label_smoothing
        self.policy_adapter = policy_adapter

    def compute_loss(self, batch: dict):
        policy = self.policy_pair_logps(batch)
        chosen_nll = -policy.chosen / policy.chosen_lengths.clamp(min=1)
        out = cpo_loss(
            policy.chosen,
            policy.rejected,
            chosen_nll,
            beta=self.beta,
            alpha=self.alpha,
            loss_type=self.loss_type,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
            simpo_gamma=self.simpo_gamma,
            label_smoothing=self.label_smoothing,
        )
        metrics = self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)
        metrics["nll_loss"] = chosen_nll.detach().mean()
        return out.losses.mean(), metrics


class ORPO(PreferenceMethod):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691): SFT on the chosen
    completion plus an odds-ratio penalty on the rejected one, in one stage, no reference model.

    Args:
        beta: weight λ of the odds-ratio term (the paper's λ; TRL's ``beta``).
        policy_adapter: the adapter trained as the policy.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    def __init__(self, *, beta: float = 0.1, policy_adapter: str = "policy", **kwargs):
        super().__init__(**kwargs)
        if beta <= 0:
            raise ValueError(f"ORPO: beta must be > 0, got {beta}")
        self.beta = beta
        self.policy_adapter = policy_adapter

    def compute_loss(self, batch: dict):
        policy = self.policy_pair_logps(batch)
        out = orpo_loss(policy.chosen, policy.rejected, policy.chosen_lengths, policy.rejected_lengths, beta=self.beta)
        metrics = self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)
        metrics["nll_loss"] = (-policy.chosen / policy.chosen_lengths.clamp(min=1)).detach().mean()
        return out.losses.mean(), metrics
