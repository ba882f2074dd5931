"""Reward modelling: a Bradley-Terry scorer as a ``reward`` adapter + score head on the shared base.

One forward scores chosen and rejected rows together (the preference collator stacks them);
the score is the head's output at the last non-padding token (``AdapterBank.score``), found from the
attention mask: the EOS ending each row even where the pad token is the EOS (transformers'
``ForSequenceClassification``, TRL's reward model, reads the last token that is not the pad id, the one
before that EOS). After training, the adapter and its head are saved in PEFT format with ``lit_rlhf.json`` metadata:
the base's fingerprint, the base and tokenizer paths, and (``normalize_on``) the mean and
standard deviation of the final model's scores over a reference set. The PPO stage loads it
onto the same base with ``AdapterSpec("reward", path=..., head="score", trainable=False)``;
from Python, :func:`lit_rlhf.rollout.score_texts` scores strings in one call.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_rlhf.data.datamodules import ExampleDataset
from lit_rlhf.distributed import global_means
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.losses import bradley_terry_loss
from lit_rlhf.methods.offline import OfflineMethod
from lit_rlhf.models import AdapterSpec, model_identity

log = logging.getLogger("lit_rlhf.methods")

#: Which preference data the export's score statistics are computed over (``None``: none).
NormalizeOn = Literal["val", "train"]
NORMALIZE_ON = (*get_args(NormalizeOn), None)


class RewardModeling(OfflineMethod):
    """Bradley-Terry reward model (Ouyang et al. 2022, arXiv 2203.02155) on preference pairs.

    Trains the ``reward`` adapter and its score head (``train_mode: lora``), or the whole base
    plus the head (``train_mode: full``). Logs ``loss``, ``accuracy`` (fraction of pairs with
    score(chosen) > score(rejected)), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, and the same under ``val/`` (means over the epoch's pairs). Preference rows
    may carry a ``margin`` (how much better ``chosen`` is): the loss is then
    ``-logσ(r_c - r_r - margin)`` (Llama 2).

    Args:
        reward_adapter: the adapter (with a ``score`` head) trained and exported.
        center_coefficient: weight of the centring term ``c (r_c + r_r)^2`` that keeps scores
            near zero (Eisenstein et al. 2023); ``None`` for none (TRL suggests 0.01).
        normalize_on: at export, compute the mean and standard deviation of the final scores
            over the ``val`` (or ``train``) preference data, chosen and rejected rows together,
            and record them in the adapter's ``lit_rlhf.json`` as ``normalization``;
            ``None`` records none.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    # Scores come from the trunk's hidden states, as TRL's reward model adds no load-balancing loss either.
    adds_router_aux_loss = False

    def __init__(
        self,
        *,
        reward_adapter: str = "reward",
        center_coefficient: float | None = None,
        normalize_on: NormalizeOn | None = "val",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if center_coefficient is not None and not center_coefficient >= 0:
            raise InvalidArgument("center_coefficient", f"RewardModeling: center_coefficient must be >= 0 (or None), "
                                  f"got {center_coefficient}")
        if normalize_on not in NORMALIZE_ON:
            raise InvalidArgument("normalize_on", f"RewardModeling: normalize_on must be one of {NORMALIZE_ON}, "
                                  f"got {normalize_on!r}")
        self.reward_adapter = reward_adapter
        self.center_coefficient = center_coefficient
        self.normalize_on = normalize_on
        self.normalization: dict[str, float] | None = None
        self._normalized_at: int | None = None

    @property
    def trained_adapter(self) -> str:
        return self.reward_adapter

    def required_adapters(self) -> list[AdapterSpec]:
        return [AdapterSpec(self.reward_adapter, head="score")]

    # -- the step -------------------------------------------------------------------------------

    def pair_scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of chosen and rejected rows from one forward: two ``(batch,)`` float32 tensors."""
        scores = self.scores(batch["input_ids"], batch["attention_mask"], self.reward_adapter)
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, correct (batch,) float, metrics)`` of a preference batch."""
        chosen, rejected = self.pair_scores(batch)
        # An optional per-row target margin from the data (Llama 2, arXiv 2307.09288): `margin` in preference rows.
        out = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"), center_coefficient=self.center_coefficient)
        metrics = {
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/margins": out.margins.mean(),
        }
        return out.losses.mean(), (out.margins > 0).float(), metrics

    def training_step(self, batch: dict, batch_idx: int):
        loss, correct, metrics = self.compute_loss(batch)
        pairs = correct.shape[0]
        # Every metric is a mean over the batch's pairs: logged over every rank's pairs, as TRL gathers them.
        means = global_means({"loss": (loss, pairs), "accuracy": (correct.mean(), pairs)}
                             | {name: (value, pairs) for name, value in metrics.items()}, self.device)
        self.log_means(means, prog_bar=("loss", "accuracy"))
        return self.skip_if_nonfinite(loss)

    # Validation and test: every metric a mean over the epoch's pairs (of every rank, each once).

    def _evaluation_step(self, batch: dict) -> None:
        loss, correct, metrics = self.compute_loss(batch)
        pairs = correct.shape[0]
        self.accumulate_evaluation_means({"loss": (loss, pairs), "accuracy": (correct.mean(), pairs)}
                                         | {name: (value, pairs) for name, value in metrics.items()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation_means("val", prog_bar=("loss", "accuracy"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation_means("test")

    # -- normalisation and export ---------------------------------------------------------------

    @torch.no_grad()
    def score_statistics(self, loader) -> dict[str, float]:
        """Mean and standard deviation of the scores of every row (chosen and rejected) of ``loader``."""
        was_training = self.training
        self.eval()
        total, total_sq, count = 0.0, 0.0, 0
        try:
            for batch in loader:
                ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                scores = self.scores(ids, mask, self.reward_adapter).double()
                total += scores.sum().item()
                total_sq += scores.square().sum().item()
                count += scores.numel()
        finally:
            self.train(was_training)
        if count == 0:
            raise ValueError("no rows to compute reward normalisation statistics from")
        mean = total / count
        return {"mean": mean, "std": math.sqrt(max(total_sq / count - mean**2, 0.0)), "count": count}

    def _reference_loader(self):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or self.normalize_on is None:
            return None
        split = self.normalize_on
        if split == "val" and not datamodule.val_examples:
            rank_zero_warn("normalize_on='val' but there is no validation data: normalising on the training data")
            split = "train"
        # The whole split in order, as one process reads it: rank 0 exports, and the loaders hold one rank's share.
        return DataLoader(ExampleDataset(getattr(datamodule, f"{split}_examples")), batch_size=datamodule.batch_size,
                          collate_fn=datamodule.collator)

    def export(self, path: str | Path, *, merged: bool = False) -> Path:
        """Save the adapter and head (or, ``merged``/full, the model plus ``head.safetensors``) with metadata.

        With ``normalize_on`` set and a Trainer attached (the export callback), the score
        statistics of the final weights over the reference data are recorded as well.
        """
        self.configure_model()
        loader = self._reference_loader()
        if loader is not None and self._normalized_at != self.global_step:  # once per export of the same weights
            self.normalization = self.score_statistics(loader)
            self._normalized_at = self.global_step
            log.info("reward normalisation over %s data: %s", self.normalize_on, self.normalization)
        elif loader is None and self.normalize_on is not None:
            log.warning("no data attached to compute reward normalisation statistics: none recorded")
        metadata = self.export_metadata()
        if merged or self.bank.full:
            return self.bank.export_merged(path, adapter=self.reward_adapter, keep_head=True, metadata=metadata)
        return self.bank.save_adapter(self.reward_adapter, path, metadata=metadata)

    def export_metadata(self) -> dict[str, Any]:
        """What a scorer needs beside the weights: base and tokenizer paths, normalisation statistics."""
        spec = self.bank_spec
        # base_model itself is recorded by bank.save_adapter.
        meta: dict[str, Any] = {"tokenizer": model_identity(spec.tokenizer or spec.model)}
        if self.normalization is not None:
            meta["normalization"] = self.normalization
        return meta


#: The method's earlier name, kept because LightningCLI wrote it into the ``config.yaml`` and the
#: checkpoint hyperparameters (``_class_path``) of every earlier run, which ``--ckpt_path`` and
#: ``lit-rlhf export`` read back. ``RewardModeling`` names it apart from ``Rewards``, the online
#: methods' combination of reward sources.
Reward = RewardModeling
