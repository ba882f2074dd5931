"""Rejection sampling (best-of-n) fine-tuning: sample ``n`` responses per prompt, keep the best by
reward, fine-tune on it with the SFT loss, and repeat with the improved policy.

Touvron et al. 2023, "Llama 2", arXiv 2307.09288, section 3.2.3 (rejection sampling fine-tuning);
Dong et al. 2023, "RAFT: Reward rAnked FineTuning", arXiv 2304.06767.

Two ways to use it:

- as a method, ``BestOfN`` (``lit-rlhf fit --config configs/best_of_n.yaml``): each
  ``training_step`` is one round of RAFT on the shared online loop. ``OnlineMethod`` samples
  ``n = num_samples_per_prompt`` responses per prompt and scores them with the reward sources;
  ``compute_advantages`` marks each prompt's best response (optionally only if it reaches
  ``min_score``); ``update`` takes ``update_epochs`` x ``num_mini_batches`` optimizer steps of the
  SFT loss (``completion_nll``: mean NLL per response token, stop token included) over the kept
  prompt + response rows. No reference and no ratio: the samples are fresh each round.
- as a data generator, ``generate_best_of_n`` / ``lit-rlhf best-of-n`` (``lit_rlhf.cli``): a JSONL
  dataset of ``sft`` rows (``{"prompt", "completion"}``, the best response) or ``preference``
  rows (``{"prompt", "chosen": best, "rejected": worst}``) that ``SFTDataModule`` /
  ``PreferenceDataModule`` load, written atomically (a temporary file renamed into place)::

      lit-rlhf best-of-n --config configs/best_of_n.yaml --out data.jsonl --format preference

Metrics: ``objective/scores`` (mean over all ``n`` samples: the policy's best-of-1 score),
``objective/best_score``, ``objective/worst_score``, ``frac_reward_zero_std``, ``best_of_n/kept``
(fraction of prompts whose best response was trained on), ``loss/sft``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from lit_rlhf.distributed import every_rank
from lit_rlhf.losses import completion_nll, flat_groups
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, ScoredRollout, select_rows

log = logging.getLogger("lit_rlhf.methods")

FORMATS = ("sft", "preference")


def best_and_worst(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of each prompt's best and worst response (first one on ties).

    Args:
        scores: ``(num_prompts * k,)``; prompt ``p`` owns rows ``p*k .. p*k + k - 1``.
        k: responses per prompt.

    Returns:
        ``(best, worst)``, each ``(num_prompts,)`` long indices into ``scores``.
    """
    if scores.dim() != 1 or scores.numel() % k != 0:
        raise ValueError(f"scores must be (num_prompts * k,) with k={k}, got shape {tuple(scores.shape)}")
    grouped = scores.view(-1, k)
    offsets = torch.arange(grouped.shape[0], device=scores.device) * k
    return offsets + grouped.argmax(dim=1), offsets + grouped.argmin(dim=1)


class BestOfNTargets(NamedTuple):
    """Which rows of a rollout the SFT loss trains on. ``(B,)`` each.

    Attributes:
        is_best: True on each prompt's best-scored response (the first one on ties).
        weight: the loss weight of each row: 1 on a best response that reaches ``min_score``, else 0.
    """

    is_best: torch.Tensor
    weight: torch.Tensor


class BestOfN(OnlineMethod):
    """Rejection-sampling fine-tuning (RAFT): SFT on each prompt's best of ``n`` sampled responses.

    Args:
        num_samples_per_prompt: ``n``, responses sampled per prompt.
        min_score: train on a prompt's best response only if its reward reaches this; ``None``
            keeps every prompt's best.
        **kwargs: rollout, update (``update_epochs``: passes over the kept rows; ``num_mini_batches``;
            ``gradient_accumulation_steps``; ``max_grad_norm``), optimizer and bank arguments of
            ``OnlineMethod``.
    """

    def __init__(self, *, num_samples_per_prompt: int = 4, min_score: float | None = None, **kwargs):
        super().__init__(num_samples_per_prompt=num_samples_per_prompt, **kwargs)
        self.min_score = min_score

    def uses_reference(self) -> bool:
        return False

    def uses_behaviour_logprobs(self) -> bool:
        # The SFT loss needs no ratio: the samples are fresh each round.
        return False

    def compute_advantages(self, scored: ScoredRollout) -> BestOfNTargets:
        """Not advantages: which rows are trained on. Each prompt's best response, weighted 1 if it
        reaches ``min_score`` (else 0).

        Every prompt's best row stays in the update, below ``min_score`` with weight 0, so every
        data-parallel rank runs the same number of micro-batches (each backward is a collective)."""
        best, _ = best_and_worst(scored.scores, self.num_samples_per_prompt)
        is_best = torch.zeros_like(scored.scores, dtype=torch.bool)
        is_best[best] = True
        weight = is_best.float()
        if self.min_score is not None:
            weight = weight * (scored.scores >= self.min_score).float()
        return BestOfNTargets(is_best=is_best, weight=weight)

    def rollout_metrics(self, scored: ScoredRollout, targets: BestOfNTargets) -> dict:
        k = self.num_samples_per_prompt
        best, worst = best_and_worst(scored.scores, k)
        return {
            **super().rollout_metrics(scored, targets),
            "objective/best_score": scored.scores[best].mean(),
            "objective/worst_score": scored.scores[worst].mean(),
            "frac_reward_zero_std": flat_groups(scored.scores, k).float().mean(),
            "best_of_n/kept": targets.weight.sum() / best.numel(),
        }

    def update(self, scored: ScoredRollout, targets: BestOfNTargets) -> dict[str, float]:
        """The shared optimisation loop over each prompt's best row (weighted by ``min_score``);
        no step at all when no rank kept a row."""
        rows = targets.is_best.nonzero().squeeze(1)
        kept = select_rows(targets, rows)
        if every_rank(kept.weight.sum() == 0, kept.weight.device):
            return {}
        return super().update(scored.select(rows), kept)

    @staticmethod
    def kept_tokens(rollout, targets: BestOfNTargets) -> torch.Tensor:
        """``(B, T)``: the response tokens of the kept rows, the SFT loss's tokens."""
        return rollout.response_mask * targets.weight.unsqueeze(1).to(rollout.response_mask.dtype)

    def step_weights(self, scored: ScoredRollout, targets: BestOfNTargets) -> torch.Tensor:
        # The SFT mean is over the kept tokens of the whole step (every rank).
        return self.kept_tokens(scored.rollout, targets)

    def accumulation_weight(self, batch: MiniBatch) -> float:
        # The loss is already divided by the whole step's kept tokens: micro-batch losses just add up.
        return 1.0

    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rollout = batch.rollout
        response_mask = self.kept_tokens(rollout, batch.targets)
        # The mean over the kept tokens of the optimizer step (every micro-batch, every rank), as one process
        # holding the step's rows takes it: a per-rank mean would weigh a token by 1 / its rank's count.
        num_tokens = (response_mask.sum() if batch.step_tokens is None else batch.step_tokens).clamp(min=1)
        if self.uses_fused_head():  # no logits: the LM head fused into the log-probs, at temperature 1 (plain SFT)
            with self.bank.role(self.policy_adapter):
                logps, _ = self.fused_response_logprobs(rollout, temperature=1.0)
            loss = -(logps * response_mask).sum() / num_tokens
            return loss, {"loss/sft": loss.detach()}
        logits, _ = self.policy_logits_and_values(rollout)
        completion_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), response_mask], dim=1)
        # The logits may cover only the last positions (the last prompt token and the response): the same columns.
        window = logits.shape[1]
        nll_sum, _ = completion_nll(logits, rollout.input_ids[:, -window:], completion_mask[:, -window:])
        loss = nll_sum / num_tokens
        return loss, {"loss/sft": loss.detach()}


# -- data generation -------------------------------------------------------------------------------


def _as_completion(text: str, raw_prompt) -> str | list[dict]:
    # A conversational prompt (a message list) gets its completion as an assistant message.
    return [{"role": "assistant", "content": text}] if isinstance(raw_prompt, list) else text


@torch.no_grad()
def iter_best_of_n(
    method: OnlineMethod,
    batches: Iterable[dict],
    *,
    format: Literal["sft", "preference"] = "sft",
    min_score: float | None = None,
    with_scores: bool = False,
) -> Iterator[dict]:
    """Rows of a best-of-n dataset, one prompt at a time, sampled from ``method``'s policy.

    ``method`` (usually a ``BestOfN``; any online method works) supplies the bank, the sampling
    settings, ``n = num_samples_per_prompt`` and the reward sources. A prompt gives no row when
    its best response is empty, below ``min_score`` or cut at ``max_new_tokens`` (``sft``), or when
    best and worst tie in reward or text or either was cut (``preference``: no preference to learn).
    A cut response is left out because the data pipeline closes every completion with EOS (or the
    template's turn end): trained on, it would teach the policy to stop wherever the cut fell.

    Args:
        method: the online method whose policy samples and whose rewards score.
        batches: ``PromptDataModule`` batches (``prompt_input_ids``, ``prompt_attention_mask``,
            ``prompts``, ``raw_prompts``).
        format: ``sft`` (``{"prompt", "completion"}``) or ``preference`` (``{"prompt", "chosen", "rejected"}``).
        min_score: drop prompts whose best reward is below this.
        with_scores: add ``score`` (sft) or ``chosen_score`` / ``rejected_score`` (preference) to each row.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    k = method.num_samples_per_prompt
    if format == "preference" and k < 2:
        raise ValueError(f"a preference pair needs num_samples_per_prompt >= 2, got {k}")
    method.configure_model()
    skipped = 0
    for batch in batches:
        rollout, _, completions, reward = method.sample_and_score(batch, update_stats=False)
        ended = rollout.ended.tolist()
        scores = reward.scores.float().cpu()
        best, worst = best_and_worst(scores, k)
        raw_prompts = batch.get("raw_prompts") or batch["prompts"]
        scored = reward.valid.view(-1, k).all(dim=1).tolist()  # False: a sample's reward was skipped (non-finite)
        for p, (b, w) in enumerate(zip(best.tolist(), worst.tolist())):
            prompt, best_text, worst_text = raw_prompts[p], completions[b], completions[w]
            if (not scored[p] or not ended[b] or not best_text.strip()
                    or (min_score is not None and scores[b] < min_score)):
                skipped += 1
                continue
            if format == "sft":
                row = {"prompt": prompt, "completion": _as_completion(best_text, prompt)}
                if with_scores:
                    row["score"] = float(scores[b])
            else:
                if scores[b] == scores[w] or best_text == worst_text or not worst_text.strip() or not ended[w]:
                    skipped += 1
                    continue
                row = {"prompt": prompt, "chosen": _as_completion(best_text, prompt),
                       "rejected": _as_completion(worst_text, prompt)}
                if with_scores:
                    row.update(chosen_score=float(scores[b]), rejected_score=float(scores[w]))
            yield row
    if skipped:
        log.info("best-of-n: %d prompts gave no %s row (empty, cut at max_new_tokens, tied, below min_score or "
                 "unscored)", skipped, format)


def generate_best_of_n(method: OnlineMethod, batches: Iterable[dict], **kwargs) -> list[dict]:
    """``list(iter_best_of_n(method, batches, **kwargs))``."""
    return list(iter_best_of_n(method, batches, **kwargs))


def write_jsonl_atomic(rows: Iterable[dict], path: str | Path) -> int:
    """Write ``rows`` as JSONL to ``path`` through a temporary file in the same directory, renamed
    into place at the end: an interruption leaves no half-written file (and any previous file
    intact). Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
