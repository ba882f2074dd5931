"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired data.

Each row is a prompt, a completion and a label (desirable or not). The implicit reward is
``beta * (log pi(y|x) - log ref(y|x))``, compared with a reference point ``z0``: the batch's
KL estimate between policy and reference, taken on *mismatched* pairs (prompt i with
completion i+1: the ``kl_*`` keys of the batch), detached and clamped at 0; under data
parallelism the mean runs over the rows of every rank. A batch therefore needs two rows at
least (``UnpairedDataModule`` refuses ``batch_size < 2`` and drops a one-row remainder). The
reference is the base with adapters off (LoRA), or a frozen copy of the base (full), as in DPO;
or, with ``precompute_ref_logps``, log-probs computed once before training for the rows and for
their mismatched pairs, which are then fixed in the data (row i with completion i+1 of its split;
TRL fixes its pairs in the dataset too) so that a precomputed value exists for each.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.distributed import all_rows, global_means
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.losses import (
    KTO_LOSS_TYPES, KTOLossType, SequenceLogps, check_beta, check_loss_type, kto_kl_estimate, kto_loss,
)
from lit_rlhf.methods.offline import OfflineMethod

log = logging.getLogger("lit_rlhf.methods")

#: The KTO paper's recommended range of desirable_weight * n_desirable / (undesirable_weight * n_undesirable).
BALANCE_RANGE = (1.0, 4.0 / 3.0)


def weight_balance_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                          undesirable_weight: float) -> str | None:
    """``None`` when the weighted class ratio lies in the paper's range, else a message saying how to fix it."""
    low, high = BALANCE_RANGE
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return (f"the KTO training data has no {missing} rows (label {missing == 'desirable'}): KTO needs both kinds "
                f"({n_desirable} desirable, {n_undesirable} undesirable)")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if low <= ratio <= high:
        return None
    # Either weight alone can bring the ratio into range; name both intervals.
    weighted_desirable, weighted_undesirable = desirable_weight * n_desirable, undesirable_weight * n_undesirable
    d_low, d_high = low * weighted_undesirable / n_desirable, high * weighted_undesirable / n_desirable
    u_low, u_high = weighted_desirable / (high * n_undesirable), weighted_desirable / (low * n_undesirable)
    return (f"KTO class balance desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
            f"{desirable_weight} * {n_desirable} / ({undesirable_weight} * {n_undesirable}) = {ratio:.3f} is outside "
            f"[{low}, {high:.3f}], the range the KTO paper recommends (arXiv 2402.01306, section 4.2). To balance it, "
            f"set desirable_weight in [{d_low:.3f}, {d_high:.3f}] (keeping undesirable_weight={undesirable_weight}), "
            f"or undesirable_weight in [{u_low:.3f}, {u_high:.3f}] (keeping desirable_weight={desirable_weight}).")


def fix_kl_pairs(datamodule) -> None:
    """Give every training and validation example the completion of the next example of its split as
    its mismatched KL pair (``kl_completion_ids``), so the pair, and its reference log-prob, do not
    depend on how batches are shuffled."""
    for split in ("train", "val"):
        examples = getattr(datamodule, f"{split}_examples", None) or []
        for example, partner in zip(examples, examples[1:] + examples[:1]):
            example["kl_completion_ids"] = partner["completion_ids"]


class KTO(OfflineMethod):
    """Kahneman-Tversky Optimization of the ``policy`` adapter (or of the base, in ``full`` mode).

    Logs ``loss``, ``kl``, ``rewards/chosen`` and ``logps/chosen`` (desirable rows),
    ``rewards/rejected`` and ``logps/rejected`` (undesirable rows), ``rewards/margins``, and the
    same under ``val/``: each over the validation epoch's rows (``val/rewards/margins`` is the epoch's
    desirable mean reward minus its undesirable one, as TRL's, not a mean of per-batch margins). Warns
    once at fit start when the weighted class balance is outside the paper's recommended range.

    Args:
        beta: scale of the implicit reward, the strength of the KL constraint to the reference.
        desirable_weight: loss weight ``w_d`` of desirable rows.
        undesirable_weight: loss weight ``w_u`` of undesirable rows.
        loss_type: ``kto`` (the paper's, anchored at the KL estimate) or ``apo_zero_unpaired``
            (unpaired APO-zero, D'Oosterlinck et al. 2024, arXiv 2408.06266: anchored at 0, so the
            mismatched KL rows are never run).
        precompute_ref_logps: compute the reference log-probs of every training and validation
            row, and of its mismatched KL pair (``kto``), once before training: the reference then
            never runs again (no frozen copy kept in ``full`` mode). The KL pairs are then fixed:
            row i with the completion of row i+1 of its split, instead of the next row of its batch.
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``padding_free`` of
            ``OfflineMethod``; ``router_aux_loss_coef``, the weight of a mixture of experts' router
            load-balancing loss in the training loss (``CompletionLogpsForward``; TRL's rule).
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: KTOLossType = "kto",
        precompute_ref_logps: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_loss_type(loss_type, KTO_LOSS_TYPES, "KTO")
        check_beta(beta, "KTO")
        for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not weight > 0:
                raise InvalidArgument(name, f"KTO: {name} must be > 0, got {weight}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.loss_type = loss_type
        self.precompute_ref_logps = precompute_ref_logps

    @property
    def uses_kl_estimate(self) -> bool:
        return self.loss_type == "kto"

    def needs_reference(self) -> bool:
        return not self.precompute_ref_logps

    def attach_precomputed_reference(self) -> None:
        if self.precompute_ref_logps:
            if self.uses_kl_estimate:
                fix_kl_pairs(self.trainer.datamodule)
            self.attach_reference_logps(self.reference_fields, self._reference_rows)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        examples = getattr(self.trainer.datamodule, "train_examples", None) if self.trainer.datamodule else None
        if not examples:
            return
        n_desirable = sum(bool(e["label"]) for e in examples)
        advice = weight_balance_advice(n_desirable, len(examples) - n_desirable, self.desirable_weight,
                                       self.undesirable_weight)
        if advice:
            rank_zero_warn(advice)

    # -- reference log-probs computed once ------------------------------------------------------

    @property
    def reference_fields(self) -> tuple[str, ...]:
        return ("ref_logps", "ref_kl_logps") if self.uses_kl_estimate else ("ref_logps",)

    def _reference_rows(self, batch: dict) -> torch.Tensor:
        """``(rows, len(reference_fields))``: the rows' completion log-probs, and their KL pairs' (``kto``)."""
        prefixes = ("", "kl_") if self.uses_kl_estimate else ("",)
        return torch.stack([self.completion_logps(batch, prefix).logps for prefix in prefixes], dim=1)

    # -- the step -------------------------------------------------------------------------------

    def completion_logps(self, batch: dict, prefix: str = "") -> SequenceLogps:
        """Summed completion log-probs of the active role on the batch's ``{prefix}*`` rows."""
        return self.sequence_logps(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                   batch[f"{prefix}completion_mask"])

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
        """``(loss, metrics)``; each metric is ``(value, how many rows it averages)`` for weighted logging."""
        # The passes without gradient first: each one's logits are freed before the policy's, which
        # backward keeps, exist (never two logits tensors alive at once).
        kl = 0.0
        if self.uses_kl_estimate:
            # The reference point carries no gradient (it is detached in the loss).
            with torch.no_grad(), self.bank.role(self.trained_adapter):
                policy_kl = self.completion_logps(batch, "kl_").logps
            if "ref_kl_logps" in batch:
                reference_kl = batch["ref_kl_logps"]
            else:
                with self.bank.reference():
                    reference_kl = self.completion_logps(batch, "kl_").logps
            # One reference point for the whole data-parallel batch, the same on every rank (TRL gathers it too).
            kl = kto_kl_estimate(all_rows(policy_kl), all_rows(reference_kl))
        if "ref_logps" in batch:
            reference_logps = batch["ref_logps"]
        else:
            with self.bank.reference():
                reference_logps = self.completion_logps(batch).logps
        with self.trained_role():
            policy = self.completion_logps(batch)
        labels = batch["labels"]
        out = kto_loss(policy.logps, reference_logps, labels, kl, beta=self.beta,
                       desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                       loss_type=self.loss_type)

        batch_size = labels.shape[0]
        logps = policy.logps.detach()
        metrics: dict[str, tuple[torch.Tensor, int]] = {"kl": (out.kl, batch_size)}
        # Means over the desirable (chosen) and undesirable (rejected) rows, each weighted by its own row
        # count; a batch may hold none of one kind (weight 0, never logged).
        for side, rows in (("chosen", labels.bool()), ("rejected", ~labels.bool())):
            count = int(rows.sum())
            metrics[f"rewards/{side}"] = (out.rewards[rows].mean() if count else 0.0, count)
            metrics[f"logps/{side}"] = (logps[rows].mean() if count else 0.0, count)
        return out.losses.mean(), metrics

    def training_step(self, batch: dict, batch_idx: int):
        loss, metrics = self.compute_loss(batch)
        loss = self.add_router_aux_loss(loss)
        # Every metric over every rank's rows, as TRL gathers them (its margin too: of the gathered means).
        metrics = global_means({"loss": (loss, batch["labels"].shape[0])} | metrics, self.device)
        (chosen, n_chosen), (rejected, n_rejected) = metrics["rewards/chosen"], metrics["rewards/rejected"]
        if n_chosen and n_rejected:
            metrics["rewards/margins"] = (chosen - rejected, n_chosen + n_rejected)
        self.log_means(metrics, prog_bar=("loss",))
        return self.skip_if_nonfinite(loss)

    # -- validation and test: every metric over the epoch's rows (of every rank, each once) ------------

    def _evaluation_step(self, batch: dict) -> None:
        loss, metrics = self.compute_loss(batch)
        loss = self.evaluation_router_aux_loss(loss, metrics, batch["labels"].shape[0])
        # Each mean weighted by its own rows: the desirable rows' rewards over the desirable rows, ...
        self.accumulate_evaluation_means({"loss": (loss, batch["labels"].shape[0])} | metrics)

    def _log_evaluation(self, prefix: str) -> None:
        means = self.log_evaluation_means(prefix, prog_bar=("loss",) if prefix == "val" else ())
        chosen, rejected = means.get(f"{prefix}/rewards/chosen"), means.get(f"{prefix}/rewards/rejected")
        if chosen is not None and rejected is not None:
            self.log_global(f"{prefix}/rewards/margins", chosen - rejected)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
