"""Reward modelling: a Bradley-Terry scorer as a ``reward`` adapter + score head on the shared base.

One forward scores chosen and rejected rows together (the preference collator stacks them);
the score is the head's output at the last non-padding token (``AdapterBank.score``). After
training, the adapter and its head are saved in PEFT format with ``lit_rlhf.json`` metadata:
the base's fingerprint, the base and tokenizer paths, and (``normalize_on``) the mean and
standard deviation of the final model's scores over a reference set. The PPO stage loads it
onto the same base with ``AdapterSpec("reward", path=..., head="score", trainable=False)``;
from Python, :func:`score_texts` scores strings in one call.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torchmetrics import MeanMetric

from lit_rlhf.data import SFTCollator, Where, build_examples, pad_token_id_of, report_invalid
from lit_rlhf.losses import bradley_terry_loss
from lit_rlhf.methods.offline import OfflineMethod
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer, model_identity, read_adapter_meta

log = logging.getLogger("lit_rlhf.methods")

HEAD_FILE = "head.safetensors"
META_FILE = "lit_rlhf.json"


class Reward(OfflineMethod):
    """Bradley-Terry reward model (Ouyang et al. 2022, arXiv 2203.02155) on preference pairs.

    Trains the ``reward`` adapter and its score head (``train_mode: lora``), or the whole base
    plus the head (``train_mode: full``). Logs ``loss``, ``accuracy`` (fraction of pairs with
    score(chosen) > score(rejected)), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, and the same under ``val/``. Preference rows may carry a ``margin``
    (how much better ``chosen`` is): the loss is then ``-logσ(r_c - r_r - margin)`` (Llama 2).

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

    def __init__(
        self,
        *,
        reward_adapter: str = "reward",
        center_coefficient: float | None = None,
        normalize_on: Literal["val", "train"] | None = "val",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.reward_adapter = reward_adapter
        self.center_coefficient = center_coefficient
        self.normalize_on = normalize_on
        self.train_accuracy = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()
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
        batch_size = correct.shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=batch_size)
        self.train_accuracy(correct)
        self.log("accuracy", self.train_accuracy, prog_bar=True, batch_size=batch_size)
        self.log_dict(metrics, batch_size=batch_size)
        return self.skip_if_nonfinite(loss)

    def _eval_step(self, batch: dict, prefix: str, accuracy: MeanMetric) -> None:
        loss, correct, metrics = self.compute_loss(batch)
        batch_size = correct.shape[0]
        accuracy.update(correct)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", batch_size=batch_size, sync_dist=True)
        self.log(f"{prefix}/accuracy", accuracy, prog_bar=prefix == "val", batch_size=batch_size)
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, batch_size=batch_size, sync_dist=True)

    # Reset at the start too: a reset under inference mode (trainer.validate) leaves inference
    # tensors that a later no-grad validation (inside fit) may not update in place.
    def on_validation_epoch_start(self) -> None:
        self.val_accuracy.reset()

    def on_test_epoch_start(self) -> None:
        self.test_accuracy.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_accuracy)

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
        if self.normalize_on == "val":
            loader = datamodule.val_dataloader()
            if loader:
                return loader
            rank_zero_warn("normalize_on='val' but there is no validation data: normalising on the training data")
        return datamodule.train_dataloader()

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
        if not (merged or self.bank.full):
            return self.bank.save_adapter(self.reward_adapter, path, metadata=metadata)
        out = super().export(path, merged=True)
        # save_pretrained drops the score head: put it and the metadata beside the merged weights.
        head = self.bank.heads[self.reward_adapter].state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(out / HEAD_FILE))
        meta = {"base": None, "head": "score", **metadata}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    def export_metadata(self) -> dict[str, Any]:
        """What a scorer needs beside the weights: base and tokenizer paths, normalisation statistics."""
        spec = self.bank_spec
        # base_model itself is recorded by bank.save_adapter.
        meta: dict[str, Any] = {"tokenizer": model_identity(spec.tokenizer or spec.model)}
        if self.normalization is not None:
            meta["normalization"] = self.normalization
        return meta



# -- scoring from Python --------------------------------------------------------------------------

Text = str | tuple[Any, Any] | list[dict]


class RewardScorer:
    """Scores texts with a reward adapter (or a merged reward model) and its score head.

    Texts are tokenised exactly as the training data was (``lit_rlhf.data``), so a string gets
    the tokenizer's bos and a closing eos, like a preference row's prompt + completion. Each
    text is one of: a string (prompt and completion together), a ``(prompt, completion)``
    pair, or a list of chat messages whose last one is the assistant's reply.

    Args:
        bank: a bank carrying ``adapter`` with a ``score`` head.
        tokenizer: the tokenizer the reward model was trained with.
        adapter: the reward adapter's name.
        normalization: ``{"mean", "std"}`` applied when scoring with ``normalize=True``.
        batch_size: texts per forward pass.
    """

    def __init__(self, bank: AdapterBank, tokenizer, *, adapter: str = "reward",
                 normalization: dict[str, float] | None = None, batch_size: int = 32):
        self.bank = bank
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.normalization = normalization
        self.batch_size = batch_size
        self.collate = SFTCollator(pad_token_id_of(tokenizer))

    @classmethod
    def load(cls, path: str | Path, *, base: str | None = None, tokenizer: str | None = None,
             adapter: str = "reward", batch_size: int = 32, device: str | torch.device = "cpu") -> RewardScorer:
        """A scorer from a directory written by ``Reward.export``.

        Args:
            path: a saved reward adapter (PEFT format + ``head.safetensors``), or a merged
                reward model directory (``save_pretrained`` + ``head.safetensors``).
            base: the base model the adapter was trained on; by default the one recorded in its
                metadata (``base_model``), else PEFT's ``base_model_name_or_path``.
            tokenizer: the tokenizer; by default the recorded one, else ``base``.
            adapter: the name the adapter gets in the bank.
            batch_size: texts per forward pass.
            device: where to run.

        Raises:
            ValueError: the adapter was trained on a base of another architecture or vocabulary.
        """
        path = Path(path)
        meta = read_adapter_meta(path)
        if (path / "adapter_config.json").exists():
            peft_base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base is None:
                base = meta.get("base_model") or peft_base
                tokenizer = tokenizer or meta.get("tokenizer")
            if base is None:
                raise ValueError(f"{path} records no base model: pass base=... (the model it was trained on)")
            spec = BankSpec(model=str(base), tokenizer=tokenizer,
                            adapters=[AdapterSpec(adapter, path=str(path), head="score", trainable=False)])
            bank = AdapterBank(spec)
        elif (path / "config.json").exists() and (path / HEAD_FILE).exists():
            spec = BankSpec(model=str(path), tokenizer=tokenizer, train_mode="full",
                            adapters=[AdapterSpec(adapter, head="score", trainable=False)])
            bank = AdapterBank(spec)
            bank.heads[adapter].load_state_dict(load_file(str(path / HEAD_FILE)))
        else:
            raise FileNotFoundError(f"{path} is neither a saved reward adapter (adapter_config.json) nor a merged "
                                    f"reward model (config.json + {HEAD_FILE})")
        bank.eval().to(device)
        return cls(bank, load_tokenizer(spec), adapter=adapter, normalization=meta.get("normalization"),
                   batch_size=batch_size)

    def encode(self, texts: Sequence[Text]) -> list[dict]:
        """Tokenised examples of ``texts`` (the data pipeline's sft rows), validated up front."""
        rows = []
        for i, text in enumerate(texts, start=1):
            where = Where("texts", i, "row", "python")
            if isinstance(text, str):
                rows.append((where, {"text": text}))
            elif isinstance(text, tuple) and len(text) == 2:
                rows.append((where, {"prompt": text[0], "completion": text[1]}))
            else:
                rows.append((where, {"messages": text}))
        examples, errors = build_examples("sft", rows, self.tokenizer, max_length=None)
        report_invalid(errors, "error", "the texts to score")
        return examples

    @torch.no_grad()
    def __call__(self, texts: Sequence[Text], *, normalize: bool = False) -> list[float]:
        """One score per text; ``normalize`` maps them to ``(score - mean) / std`` of the recorded statistics."""
        if normalize and not self.normalization:
            raise ValueError("this reward model records no normalization statistics (train it with normalize_on set)")
        examples = self.encode(texts)
        device = next(self.bank.parameters()).device
        scores: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            batch = self.collate(examples[start : start + self.batch_size])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = self.bank.score(ids, mask, adapter=self.adapter)
            if normalize:
                out = (out - self.normalization["mean"]) / max(self.normalization["std"], 1e-8)
            scores.extend(out.float().cpu().tolist())
        return scores


def score_texts(path: str | Path, texts: Sequence[Text], *, base: str | None = None, batch_size: int = 32,
                normalize: bool = False) -> list[float]:
    """Score ``texts`` with the reward model saved at ``path``, in one call (see :class:`RewardScorer`).

    Example::

        score_texts("runs/reward/lightning_logs/version_0/export/adapter", ["the movie was great fun ."])
    """
    return RewardScorer.load(path, base=base, batch_size=batch_size)(texts, normalize=normalize)
