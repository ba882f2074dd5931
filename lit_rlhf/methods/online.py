"""What the online methods (PPO, RLOO, GRPO, BestOfN, OnlineDPO) share: the rollout inside the
step, with manual optimization.

One ``training_step`` is one rollout, read top to bottom in ``OnlineMethod.training_step``:

1. generate: repeat each prompt ``num_samples_per_prompt`` times and sample responses from the
   policy adapter (``rollout/`` engine);
2. score: the reward sources (``rollout/rewards``); prompts with an unscored sample leave;
3. reference and values: the behaviour log-probs (one forward of the policy, which may give the
   critic's values too) and the reference's log-probs (adapters off), without gradient; with one
   update of one micro-batch (``fuses_behaviour_pass``) the update's own forward is taken here, with
   gradient, and its detached log-probs are the behaviour log-probs;
4. advantages: ``compute_advantages(scored)`` (the subclass) returns its named per-row targets;
   the KL controller then takes this rollout's KL;
5. update: ``update_epochs`` passes over ``num_mini_batches`` shuffled mini-batches, one optimizer
   step each, every mini-batch split into ``gradient_accumulation_steps`` micro-batches whose
   ``policy_loss(minibatch)`` (the subclass) is backpropagated with ``manual_backward``;

and the rollout's metrics are logged once, at the end of the step.

A subclass implements ``compute_advantages``, ``rollout_metrics`` (its own, added to the shared
ones) and ``policy_loss`` (and, if its forward also yields critic values,
``policy_logits_and_values``). Lightning rejects ``gradient_clip_val`` and
``accumulate_grad_batches`` on the Trainer in manual mode, so the method takes ``max_grad_norm``
and ``gradient_accumulation_steps`` itself; the LR scheduler is stepped by hand after every
optimizer step. ``trainer.global_step`` counts optimizer steps; the rollouts are counted apart
(``rollout/count``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from lightning.pytorch.strategies import ParallelStrategy

from lit_rlhf.distributed import every_rank, global_means, global_sum, rank_seed
from lit_rlhf.losses import (entropy_chunk, entropy_from_logits, head_token_logps, kl_penalty, load_balancing_loss,
                             token_logps)
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.kl_control import FixedKLController
from lit_rlhf.models import AdapterSpec, eval_mode
from lit_rlhf.models.head import accepts_logits_to_keep, head_skipped
from lit_rlhf.models.prefix import prompt_groups, prompt_sharing_supported, shared_prompt_logits
from lit_rlhf.models.routers import recording_router_logits
from lit_rlhf.rollout import (
    ModelReward, RewardOutput, RewardRequest, Rewards, RewardSpec, Rollout, SamplingConfig, build_engine,
)

log = logging.getLogger("lit_rlhf.methods")


# -- what flows through a step ------------------------------------------------------------------


class ScoredRollout(NamedTuple):
    """One rollout with everything computed before the update (steps 1 to 3). ``B`` = prompts x
    samples per prompt (prompt ``p``'s samples are rows ``p*k .. p*k+k-1``), ``T`` = longest response.

    Attributes:
        rollout: ids and masks (``Rollout``).
        prompts: ``B`` rendered prompt strings.
        completions: ``B`` response texts (stop token removed).
        scores: ``(B,)`` float32 reward of each response (normalised, weighted, clipped, EOS rule).
        per_source: ``{source: (B,)}`` each reward source's raw score (``RewardOutput.per_source``).
        old_logprobs: ``(B, T)`` float32 log-probs of the response tokens under the policy at
            rollout time (0 on padding); ``None`` when the method reads none (``uses_behaviour_logprobs``).
        ref_logprobs: ``(B, T)`` the same under the reference; ``None`` when the method needs none.
        old_values: ``(B, T)`` critic values at rollout time when the policy forward yields them
            (a value head on the policy trunk), else ``None``.
        taken: the update's own forward of the policy over these rows, with gradient, when it gave
            ``old_logprobs`` (``fuses_behaviour_pass``), else ``None``.
    """

    rollout: Rollout
    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor
    per_source: dict[str, torch.Tensor]
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    taken: PolicyPass | None = None

    def select(self, index: torch.Tensor) -> ScoredRollout:
        """The rows ``index`` (a 1-d long tensor) of every field."""
        rows = index.tolist()
        return ScoredRollout(
            rollout=self.rollout.select(index),
            prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            scores=self.scores[index],
            per_source={name: v[index] for name, v in self.per_source.items()},
            old_logprobs=select_rows(self.old_logprobs, index),
            ref_logprobs=select_rows(self.ref_logprobs, index),
            old_values=select_rows(self.old_values, index),
            taken=select_rows(self.taken, index),
        )


class MiniBatch(NamedTuple):
    """The rows of one micro-batch; ``b`` rows, ``T`` response tokens.

    Attributes:
        rollout: the rows' ``Rollout``.
        old_logprobs: ``(b, T)``, or ``None`` when the method reads none.
        ref_logprobs: ``(b, T)`` or ``None``.
        targets: what ``compute_advantages`` returned (the subclass's named tuple), each tensor's rows selected.
        step_rows: rows of the optimizer step this micro-batch belongs to (its mini-batch, on this rank).
        step_tokens: loss tokens of that optimizer step summed over every rank and divided by the
            number of ranks (DDP averages gradients), scalar; the normaliser of a global token-level loss.
        taken: the policy's forward over these rows already taken with gradient (``ScoredRollout.taken``),
            for ``policy_forward(..., taken=batch.taken)``; ``None``: the loss takes its own.
    """

    rollout: Rollout
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    targets: NamedTuple
    step_rows: int = 0
    step_tokens: torch.Tensor | None = None
    taken: PolicyPass | None = None


class PolicyPass(NamedTuple):
    """One forward of the policy over rollout rows, cut to the ``T`` positions that predict response tokens.

    Attributes:
        logits: ``(b, T, vocab)`` divided by the sampling temperature; ``None`` where the LM head was fused
            into the log-probs (``OnlineMethod.fuses_policy_head``).
        logprobs: ``(b, T)`` float32 log-probs of the response tokens, 0 on padding.
        values: ``(b, T)`` critic values at those positions when the forward yields them, else ``None``.
        entropy: ``(b, T)`` float32 entropy without gradient, 0 on padding, of a fused pass asked for it.
        router_aux: the scalar router load-balancing loss of this forward's real tokens, where the method adds
            it (``OnlineMethod.adds_router_aux_loss``) on a mixture of experts, else ``None``.
    """

    logits: torch.Tensor | None
    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None = None
    router_aux: torch.Tensor | None = None


class PolicyOutput(NamedTuple):
    """One forward of the policy over rollout rows. All ``(b, T)`` float32, 0 on padding.

    Attributes:
        logprobs: log-probs of the response tokens (temperature applied as when sampling).
        entropy: per-token entropy of the policy, when asked for.
        values: critic values at the positions predicting each response token, when the forward yields them.
        router_aux: ``PolicyPass.router_aux``.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None
    router_aux: torch.Tensor | None = None


def select_rows(rows, index: torch.Tensor):
    """``rows[index]`` of a tensor, of each tensor field of a named tuple (``None`` fields stay), or ``None``."""
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        return rows[index]
    return type(rows)(*(select_rows(field, index) for field in rows))


def kept_logits(logits_to_keep: int | None) -> dict:
    """The forward keyword that limits the LM head to the last ``logits_to_keep`` positions; none for all."""
    return {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}


def sampled_entropy(scored: ScoredRollout) -> torch.Tensor:
    """Mean over responses of ``-Σ_t log π(y_t)``, the policy's entropy estimated from its own samples
    (TRL's ``objective/entropy``). Scalar."""
    return (-scored.old_logprobs * scored.rollout.response_mask).sum(dim=1).mean()


# -- the update's settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateArgs:
    """How step 5 optimises each rollout (after litgpt's ``TrainArgs``). A method takes these as flat
    arguments of the same names (so configs and ``--model.init_args.num_mini_batches`` stay flat);
    ``OnlineMethod`` groups and checks them here.

    Attributes:
        update_epochs: passes over each rollout (cleanrl's name; GRPO's μ; TRL's ``num_ppo_epochs``
            or ``num_iterations``). Formerly ``ppo_epochs``: every online method takes them.
        num_mini_batches: optimizer steps per pass; each takes ``rows / num_mini_batches`` rows of the rollout.
        gradient_accumulation_steps: micro-batches per mini-batch (backward each, step once); manual
            optimization's stand-in for the Trainer's ``accumulate_grad_batches``.
        max_grad_norm: clip the gradient norm of each optimizer step to this; ``None`` for no clipping;
            the stand-in for the Trainer's ``gradient_clip_val``.
    """

    update_epochs: int = 1
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("update_epochs", "num_mini_batches", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def optimizer_steps(self, rollouts: int) -> int:
        """Optimizer steps of ``rollouts`` rollouts."""
        return rollouts * self.update_epochs * self.num_mini_batches


# -- the base ------------------------------------------------------------------------------------


class OnlineMethod(BankMethod, metaclass=ABCMeta):
    """Base of the online methods: generate -> score -> reference and values -> advantages -> update.

    Subclasses implement:

    - ``compute_advantages(scored: ScoredRollout) -> NamedTuple``: the named per-row tensors (first
      dim ``B``) the loss reads, e.g. ``GRPOTargets(advantages=...)``; no logging, no state change.
    - ``rollout_metrics(scored, targets) -> dict``: their rollout metrics added to the shared ones
      (``super().rollout_metrics``), taken before the KL controller moves.
    - ``policy_loss(batch: MiniBatch) -> tuple[Tensor, dict[str, Tensor]]``: the scalar loss of a
      micro-batch and detached metrics; use ``self.policy_forward``.

    Args:
        rewards: the reward sources (``RewardSpec``), e.g.
            ``[{kind: function, function: "lit_rlhf.toy:reward"}]``.
        sampling: how responses are sampled during training (validation decodes greedily with
            the same ``max_new_tokens``; ``val/score`` is the mean over the epoch's responses with a
            finite score, ``val/response_length`` over all of them).
        engine: the rollout engine's registered name: ``auto`` (``hf_static`` on CUDA; see
            ``lit_rlhf.rollout.engine.AutoEngine``), ``hf``, ``hf_static``, or one you register.
        num_samples_per_prompt: responses sampled per prompt (``k``; RLOO and GRPO need ``k >= 2``).
        update_epochs, num_mini_batches, gradient_accumulation_steps, max_grad_norm: the update's
            settings, documented and checked by ``UpdateArgs`` (``self.update_args``).
        reward_clip: clip the combined reward to ``[-reward_clip, reward_clip]``.
        missing_eos_penalty: subtracted from the reward of responses cut at ``max_new_tokens``.
        missing_eos_score: replaces the reward of such responses.
        log_samples_every_n_rollouts: log a table of sample completions every this many rollouts
            (TensorBoard text); 0 never.
        num_logged_samples: rows in that table.
        ppo_epochs: deprecated name of ``update_epochs``.
        router_aux_loss_coef: where the method adds it (``adds_router_aux_loss``: GRPO, RLOO), the weight of a
            mixture of experts' router load-balancing loss over the update forward's real tokens (prompt and
            response, ``rollout_logits``), as TRL 1.16 adds it; ``None``: the model config's, ``0``: off (the
            rule of ``base.router_aux_weight``). Logged as ``aux_loss``.
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``.
    """

    #: A method with a KL penalty sets it; its state then travels in checkpoints.
    kl_controller: FixedKLController | None = None
    #: The per-token KL estimate whose sum per response the KL controller observes (with ``kl_controller``).
    kl_estimator: str = "k1"
    #: Consecutive rows the update never separates (2 for a method whose loss compares the two samples of a prompt).
    rows_kept_together: int = 1

    def __init__(
        self,
        *,
        rewards: list[RewardSpec] | None = None,
        sampling: SamplingConfig | None = None,
        engine: str = "auto",
        num_samples_per_prompt: int = 1,
        update_epochs: int = 1,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        missing_eos_score: float | None = None,
        log_samples_every_n_rollouts: int = 10,
        num_logged_samples: int = 8,
        ppo_epochs: int | None = None,
        router_aux_loss_coef: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_router_aux_loss_coef(router_aux_loss_coef,
                                       "of the online methods only GRPO and RLOO add it, as in TRL 1.16")
        self._router_aux: torch.Tensor | None = None  # of the last forward with gradients, for its PolicyPass
        if not rewards:
            raise ValueError(
                "an online method needs reward sources, e.g. rewards: [{kind: function, function: 'lit_rlhf.toy:reward'}]"
            )
        if num_samples_per_prompt < 1:
            raise ValueError(f"num_samples_per_prompt must be >= 1, got {num_samples_per_prompt}")
        self.update_args = UpdateArgs(update_epochs=resolve_update_epochs(update_epochs, ppo_epochs),
                                      num_mini_batches=num_mini_batches,
                                      gradient_accumulation_steps=gradient_accumulation_steps,
                                      max_grad_norm=max_grad_norm)
        self.automatic_optimization = False
        self.reward_specs = [RewardSpec(**r) if isinstance(r, dict) else r for r in rewards]
        self.sampling = sampling or SamplingConfig()
        self.store_plain_hparams(rewards=self.reward_specs, sampling=self.sampling)
        self.rewards = Rewards(self.reward_specs, clip=reward_clip, missing_eos_penalty=missing_eos_penalty,
                               missing_eos_score=missing_eos_score)
        self.engine = build_engine(engine)
        self.num_samples_per_prompt = num_samples_per_prompt
        self.log_samples_every_n_rollouts = log_samples_every_n_rollouts
        self.num_logged_samples = num_logged_samples
        self.rollout_count = 0
        self._sampling_seed: int | None = None  # seed_everything's seed, read at the first rollout
        self._prompt_sharing: bool | None = None
        self.last_samples: list[tuple[str, str, float]] = []

    # -- the step --------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        # 1. generate, 2. score, 3. reference and values (see rollout_and_score, just below)
        scored = self.rollout_and_score(batch)
        if not scored.prompts:  # nonfinite: skip dropped every prompt: no update this rollout
            self.rollout_count += 1
            return
        # 4. advantages; the rollout's metrics read β before the controller moves it for the next rollout
        targets = self.compute_advantages(scored)
        metrics = self.global_rollout_metrics(scored, targets)
        if self.kl_controller is not None and scored.ref_logprobs is not None:
            self.kl_controller.observe(self.sequence_kl(scored))
        # 5. update
        metrics.update(self.update(scored, targets))
        self.rollout_count += 1
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["rollout/count"] = float(self.rollout_count)
        self.log_rollout_metrics(metrics, batch_size=scored.scores.shape[0])
        self.maybe_log_samples(scored)

    def rollout_and_score(self, batch: dict) -> ScoredRollout:
        """Steps 1 to 3 of a rollout; without gradient, except the update's own forward when it is fused
        into step 3 (``fuses_behaviour_pass``)."""
        # 1. generate and 2. score
        rollout, prompts, completions, reward = self.drop_unscored(*self.sample_and_score(batch))
        scored = ScoredRollout(rollout=rollout, prompts=prompts, completions=completions, scores=reward.scores,
                               per_source=reward.per_source)
        if not prompts:
            return scored
        fused = self.fuses_behaviour_pass()
        # 3. reference and values. Behaviour log-probs in eval mode too: with dropout (LoRA dropout > 0)
        # the first PPO ratio would not be 1.
        with torch.no_grad(), eval_mode(self.bank):
            ref_logprobs = self.reference_logprobs(rollout) if self.uses_reference() else None
            behaviour = None
            if self.uses_behaviour_logprobs() and not fused:
                # Recomputed rather than read from generate: its scores are post-warping (temperature, top-k/p).
                behaviour = self.policy_forward(rollout)
            # A critic on the policy's trunk comes with the policy's forward; a separate one has its own.
            values = behaviour.values if behaviour is not None else None
            values = values if values is not None else self.critic_values(rollout)
        scored = scored._replace(ref_logprobs=ref_logprobs, old_values=values)
        if behaviour is not None:
            return scored._replace(old_logprobs=behaviour.logprobs)
        if not fused:
            return scored
        # The update's only forward, taken now (after the reference's, so its graph is not alive during it):
        # the weights it sees are the ones a behaviour forward would see, so its detached log-probs are the
        # behaviour log-probs, and the ratio of the update is exactly 1.
        taken = self.policy_pass(rollout, with_entropy=self.loss_entropy() is not None)
        old_values = taken.values.detach() if taken.values is not None else values
        return scored._replace(old_logprobs=taken.logprobs.detach(), old_values=old_values, taken=taken)

    def fuses_behaviour_pass(self) -> bool:
        """Whether step 3's behaviour forward is the update's own forward, detached, rather than a separate
        no-grad forward.

        Exact when the update is one optimizer step over one micro-batch holding every row (``update_epochs``,
        ``num_mini_batches`` and ``gradient_accumulation_steps`` all 1): no step changes the weights between
        rollout and update. Not with dropout: the behaviour log-probs must be the sampling distribution's
        (eval mode), not one dropout draw's. Gradient accumulation would keep every micro-batch's graph alive
        until the advantages are known, so it keeps the separate forward."""
        args = self.update_args
        return (self.uses_behaviour_logprobs() and self.bank_spec.disable_dropout and args.update_epochs == 1
                and args.num_mini_batches == 1 and args.gradient_accumulation_steps == 1)

    # -- what subclasses implement ----------------------------------------------------------------

    @abstractmethod
    def compute_advantages(self, scored: ScoredRollout) -> NamedTuple:
        """Named per-row tensors (first dim ``B``) the loss reads; see the class docstring."""

    @abstractmethod
    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of a micro-batch and detached metrics; see the class docstring."""

    def rollout_metrics(self, scored: ScoredRollout, targets: NamedTuple) -> dict[str, float | torch.Tensor]:
        """Means over this rank's rollout rows (scores, lengths; subclasses add theirs, means over their rows
        or over as many groups per row on every rank); ``global_rollout_metrics`` takes them over every rank."""
        rollout = scored.rollout
        per_source = scored.per_source if len(scored.per_source) > 1 else {}
        metrics = {
            "objective/scores": scored.scores.float().mean(),
            "response_length": rollout.response_lengths.float().mean(),
            "rollout/ended_with_eos": rollout.ended.float().mean(),
        }
        metrics.update({f"objective/scores/{name}": values.float().mean() for name, values in per_source.items()})
        return metrics

    def global_rollout_metrics(self, scored: ScoredRollout, targets: NamedTuple) -> dict[str, float]:
        """``rollout_metrics`` over every data-parallel rank's rows, weighted by the rows, in one all-reduce (a
        collective; the logger writes rank 0's values). A ratio of two means (PPO's ``value/explained_variance``)
        becomes the mean of the ranks' ratios."""
        rows = scored.scores.shape[0]
        local = {name: (value, rows) for name, value in self.rollout_metrics(scored, targets).items()}
        means = global_means(local, self.device)
        metrics = {name: mean for name, (mean, _) in means.items()}
        metrics["rollout/episodes"] = float((self.rollout_count + 1) * means["objective/scores"][1])
        return metrics

    def uses_reference(self) -> bool:
        """Whether the reference's log-probs are computed for each rollout."""
        return True

    def uses_behaviour_logprobs(self) -> bool:
        """Whether the loss reads the log-probs at rollout time (step 3 is skipped when not)."""
        return True

    def loss_entropy(self) -> Literal["metric", "gradient"] | None:
        """What ``policy_loss`` reads of the policy's per-token entropy: nothing, a ``"metric"`` (or a mask:
        no gradient, which the fused LM head's chunks give), or a term with ``"gradient"`` (an entropy bonus:
        the forward keeps its logits)."""
        return None

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """``(b, T)``: the response tokens that enter the loss (all of them unless a subclass says otherwise)."""
        return rollout.response_mask

    def step_weights(self, scored: ScoredRollout, targets: NamedTuple) -> torch.Tensor:
        """``(B, T)`` or ``(B, 1)``: what a step's loss is normalised by, per row, summed over the step's
        rows and every rank into ``MiniBatch.step_tokens``. The loss tokens by default; a loss over
        weighted rows (best-of-n's kept rows, Online DPO's untied pairs) counts those instead."""
        return self.loss_mask(scored.rollout)

    def accumulation_weight(self, batch: MiniBatch) -> float:
        """Factor on a micro-batch's loss before backward. By default its share of the step's rows,
        so the step sees the mean over the mini-batch; a loss already normalised by the whole step
        (``batch.step_tokens``) returns 1."""
        return batch.rollout.response_ids.shape[0] / batch.step_rows

    def policy_logits_and_values(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the policy over the rows (``rollout_logits``), and critic values at the same positions if
        the same pass gives them."""
        with self.bank.role(self.policy_adapter):
            return self.rollout_logits(rollout), None

    def critic_values(self, rollout: Rollout) -> torch.Tensor | None:
        """``(b, T)`` values of a critic separate from the policy's forward, or ``None`` without one."""
        return None

    def sequence_kl(self, scored: ScoredRollout) -> torch.Tensor:
        """``(B,)`` KL of each response to the reference at rollout time: the sum over its tokens of the
        ``kl_estimator`` estimate (what the KL penalty charges and the KL controller observes)."""
        kl = kl_penalty(scored.old_logprobs, scored.ref_logprobs, kind=self.kl_estimator)
        return (kl * scored.rollout.response_mask).sum(dim=1)

    # -- 1. generate and 2. score ------------------------------------------------------------------

    def sample_and_score(self, batch: dict, *, update_stats: bool = True) -> tuple[Rollout, list[str], list[str], RewardOutput]:
        """Sample ``num_samples_per_prompt`` responses per prompt (prompt ``p``'s are rows
        ``p*k .. p*k+k-1``) and score them: ``(rollout, prompts, completions, reward)``."""
        k = self.num_samples_per_prompt
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        prompts, raw_prompts = list(batch["prompts"]), batch.get("raw_prompts")
        if k > 1:
            prompt_ids = prompt_ids.repeat_interleave(k, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
            prompts = [p for p in prompts for _ in range(k)]
            raw_prompts = [p for p in raw_prompts for _ in range(k)] if raw_prompts is not None else None
        # Each rank samples with its own seed, fixed by (seed, rank, rollout): ranks never share random
        # draws, and a resumed run draws what the uninterrupted one did whatever the global RNG saw.
        if self._sampling_seed is None:
            self._sampling_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        seed = rank_seed(self._sampling_seed, self.global_rank, self.rollout_count)
        with torch.random.fork_rng(devices=[prompt_ids.device] if prompt_ids.is_cuda else []):
            torch.manual_seed(seed)
            rollout = self.generate_rollout(prompt_ids, prompt_mask, self.train_sampling)
        completions, reward = self.score_responses(rollout, prompts, raw_prompts, update_stats=update_stats)
        return rollout, prompts, completions, reward

    @torch.no_grad()
    def generate_rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig) -> Rollout:
        """Sample from the policy in eval mode (no dropout; the KV cache is on even with gradient checkpointing)."""
        with eval_mode(self.bank):
            return self.engine.generate(self.bank, self.policy_adapter, prompt_ids, prompt_mask, sampling)

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """Response texts without the stop token."""
        lengths = (rollout.response_lengths - rollout.ended.long()).tolist()
        rows = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), lengths)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def score_responses(self, rollout: Rollout, prompts: list[str], raw_prompts: list | None, *, update_stats: bool = True):
        """``RewardOutput`` of the configured reward sources for these rows."""
        completions = self.decode_responses(rollout)
        with eval_mode(self.bank):
            out = self.rewards(RewardRequest(prompts, completions, rollout, raw_prompts), update_stats=update_stats)
        return completions, out

    def drop_unscored(self, rollout: Rollout, prompts: list[str], completions: list[str],
                      reward: RewardOutput) -> tuple[Rollout, list[str], list[str], RewardOutput]:
        """The rows of the prompts whose every sample has a reward (a source with ``nonfinite: skip``
        leaves some unscored). Whole prompts go, so each keeps its ``k`` samples for group baselines."""
        if bool(reward.valid.all()):
            return rollout, prompts, completions, reward
        k = self.num_samples_per_prompt
        keep = reward.valid.view(-1, k).all(dim=1).repeat_interleave(k).nonzero().flatten()
        dropped = reward.valid.numel() - keep.numel()
        log.warning("rollout %d: dropped %d row(s) of prompts with a non-finite reward", self.rollout_count, dropped)
        self.log_rollout_metrics({"rollout/skipped_nonfinite": float(dropped)}, batch_size=reward.valid.numel())
        rows = keep.tolist()
        reward = RewardOutput(reward.scores[keep], {n: v[keep] for n, v in reward.per_source.items()}, reward.valid[keep])
        return rollout.select(keep), [prompts[i] for i in rows], [completions[i] for i in rows], reward

    @property
    def train_sampling(self) -> SamplingConfig:
        return self.sampling.resolved(self.tokenizer, self.bank.model)

    # -- 3. log-probs: one path (lit_rlhf.losses.token_logps) ----------------------------------------

    def logits_to_keep(self, rollout: Rollout) -> int | None:
        """Positions whose logits a forward over ``rollout`` computes: the last ``T + 1`` (the LM head and
        the log-softmax then skip the prompt), or ``None`` (all) when the model's forward has no
        ``logits_to_keep``. The last kept position predicts nothing in the rollout and is dropped."""
        if not accepts_logits_to_keep(self.bank.model):
            return None
        return rollout.response_ids.shape[1] + 1

    def rollout_logits(self, rollout: Rollout) -> torch.Tensor:
        """Logits of the active role over the rows: their last ``T + 1`` positions (``logits_to_keep``), or all.

        With ``runs_shared_prompts()`` the rows that share a prompt run it once (``models.prefix``). The choice
        never depends on the rows: every rank makes the same forward calls (FSDP and ZeRO-3 gather parameters
        in lockstep), also for a mini-batch whose prompts happen to be distinct.

        With gradients, where the method adds it (``adds_router_aux_loss``), the router load-balancing loss of
        the rows' real tokens is kept for the pass (``PolicyPass.router_aux``): a shared prompt counts once per
        row sharing it, so it is the whole rows' value either way."""
        shared = self.runs_shared_prompts()
        groups = prompt_groups(rollout.prompt_ids, rollout.prompt_mask) if shared else None
        if not (self._router_aux_weight and torch.is_grad_enabled()):
            return self._rollout_forward(rollout, groups)
        with recording_router_logits(self.bank.model) as routed:
            logits = self._rollout_forward(rollout, groups)
        if groups is None:
            self._router_aux = load_balancing_loss(routed, self._router_top_k, rollout.attention_mask)
            return logits
        # The prompts' forward, then the responses': per layer, its prompt tokens (each counted once per row
        # sharing it) and its response tokens.
        layers = len(routed) // 2
        routed = [torch.cat([routed[i], routed[layers + i]]) for i in range(layers)]
        rows_per_prompt = torch.bincount(groups.of_row, minlength=groups.first.numel())
        counts = torch.cat([(rollout.prompt_mask[groups.first] * rows_per_prompt[:, None]).reshape(-1),
                            rollout.response_mask.reshape(-1)])
        self._router_aux = load_balancing_loss(routed, self._router_top_k, counts)
        return logits

    def _rollout_forward(self, rollout: Rollout, groups) -> torch.Tensor:
        """``rollout_logits``' forward: of whole rows, or of the prompts ``groups`` shares and the responses."""
        if groups is not None:
            return shared_prompt_logits(self.bank, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                        rollout.response_mask, groups)
        keep = self.logits_to_keep(rollout)
        return self.bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids, **kept_logits(keep)).logits

    def take_router_aux(self) -> torch.Tensor | None:
        """The router load-balancing loss kept by the last ``rollout_logits`` with gradients, once."""
        aux, self._router_aux = self._router_aux, None
        return aux

    def add_router_aux_loss(self, loss: torch.Tensor, out: PolicyOutput, batch: MiniBatch,
                            metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` plus the micro-batch's share of ``router_aux_loss_coef · aux`` (logged as ``aux_loss``), so
        that an optimizer step's gradient is that of the weight times the mean load-balancing loss of its
        micro-batches, as TRL's GRPO and RLOO take it (each micro-batch's ``aux`` divided by the accumulation
        steps). ``loss`` itself where the forward gave none."""
        if out.router_aux is None:
            return loss
        metrics["aux_loss"] = out.router_aux.detach()
        share = batch.rollout.response_ids.shape[0] / batch.step_rows / self.accumulation_weight(batch)
        return loss + self._router_aux_weight * share * out.router_aux

    def runs_shared_prompts(self) -> bool:
        """Whether the policy, behaviour and reference forwards run each distinct prompt once: with several
        samples per prompt, where the model allows it (``shares_prompts``), and not under gradient
        checkpointing, which drops the cache in the update's forward. All of them or none: in bfloat16 the two
        ways round differently, so a behaviour forward run otherwise than the update's would start the ratio
        off 1, and a reference forward run otherwise than the policy's the KL off 0."""
        return self.num_samples_per_prompt > 1 and not self.bank_spec.gradient_checkpointing and self.shares_prompts()

    def shares_prompts(self) -> bool:
        """Whether the model gives the same logits with each distinct prompt run once: checked once, on a
        tiny rollout, at the first forward; else whole rows, with the reason logged."""
        if self._prompt_sharing is None:
            embeddings = self.bank.model.get_input_embeddings()  # a LoRA embedding lacks num_embeddings
            with eval_mode(self.bank):
                supported = prompt_sharing_supported(self.bank, embeddings.weight.shape[0], embeddings.weight.device)
            log.info("rollout forwards %s", "run each distinct prompt once" if supported else
                     "run whole rows (the model's KV cache does not give the same logits with shared prompts)")
            self._prompt_sharing = supported
        return self._prompt_sharing

    def response_logits(self, logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """The logits that predict each response token, divided by the sampling temperature. ``(b, T, vocab)``.

        ``logits`` cover the whole sequence or its last ``T + 1`` positions (``logits_to_keep``): either way
        the response is predicted by the ``T`` positions before the last."""
        logits = self.response_slice(logits, rollout, masked=False)
        temperature = self.sampling.temperature
        return logits / temperature if temperature != 1.0 else logits

    def response_logprobs(self, logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """``(b, T)`` float32 log-probs of the response tokens from whole-sequence (or kept) logits, 0 on padding."""
        logps = token_logps(self.response_logits(logits, rollout), rollout.response_ids)
        return logps * rollout.response_mask

    def response_slice(self, per_position: torch.Tensor, rollout: Rollout, *, masked: bool = True) -> torch.Tensor:
        """Per-position values of whole sequences (or of their last ``T + 1`` positions) -> the ``T`` positions
        predicting response tokens, ``(b, T, ...)``; times the response mask unless ``masked=False``."""
        T = rollout.response_ids.shape[1]
        kept = per_position[:, per_position.shape[1] - T - 1 : per_position.shape[1] - 1]
        return kept * rollout.response_mask if masked else kept

    def fuses_policy_head(self) -> bool:
        """Whether the policy's forward takes its log-probs with the LM head fused in (no logits): where the
        model allows it (``uses_fused_head``) and the loss differentiates no entropy."""
        return self.loss_entropy() != "gradient" and self.uses_fused_head()

    def fused_response_logprobs(self, rollout: Rollout, *, with_entropy: bool = False,
                                temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(b, T)`` float32 log-probs of the response tokens under the active role, 0 on padding, with the LM
        head fused in (``losses.head_token_logps``): the forward of ``rollout_logits`` (whole rows or shared
        prompts) hands back the head's inputs, and neither the ``(b, T, vocab)`` logits nor their gradient
        exist whole. With ``with_entropy``, the entropy at each response token too (no gradient). The logits
        are divided by ``temperature``, by default the sampling temperature."""
        head = self.bank.output_embeddings()
        with head_skipped(head):
            hidden = self.rollout_logits(rollout)
        mask = rollout.response_mask.bool()
        hidden = self.response_slice(hidden, rollout, masked=False)[mask]  # padding costs no head
        bias, temperature = head.bias, self.sampling.temperature if temperature is None else temperature
        if temperature != 1.0:  # logits / t == (hidden / t) @ W.T + bias / t: the tempered logits, made directly
            hidden, bias = hidden / temperature, None if bias is None else bias / temperature
        logps, entropy = head_token_logps(hidden, head.weight, bias, rollout.response_ids[mask],
                                          statistic=entropy_chunk if with_entropy else None)

        def per_token(values):
            return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)

        return per_token(logps), per_token(entropy)

    def policy_pass(self, rollout: Rollout, *, with_entropy: bool = False) -> PolicyPass:
        """One forward of the policy over the rows, cut to the response: logits (unless fused), log-probs,
        values if it gives them, and on a fused pass the entropy if ``with_entropy``."""
        self._router_aux = None
        if self.fuses_policy_head():
            with self.bank.role(self.policy_adapter):
                logprobs, entropy = self.fused_response_logprobs(rollout, with_entropy=with_entropy)
            return PolicyPass(None, logprobs, None, entropy, self.take_router_aux())
        logits, values = self.policy_logits_and_values(rollout)
        logits = self.response_logits(logits, rollout)
        logprobs = token_logps(logits, rollout.response_ids) * rollout.response_mask
        return PolicyPass(logits, logprobs, None if values is None else self.response_slice(values, rollout),
                          router_aux=self.take_router_aux())

    def policy_forward(self, rollout: Rollout, *, with_entropy: bool = False, taken: PolicyPass | None = None) -> PolicyOutput:
        """The policy's response log-probs (+ entropy, + values if the pass gives them) over the rows: of
        ``taken`` (the pass ``MiniBatch.taken`` already holds) or of a new forward."""
        taken = self.policy_pass(rollout, with_entropy=with_entropy) if taken is None else taken
        entropy = None
        if with_entropy:
            entropy = taken.entropy if taken.logits is None else entropy_from_logits(taken.logits) * rollout.response_mask
            if entropy is None:  # a subclass whose loss reads the entropy must say so in loss_entropy()
                raise RuntimeError("the fused policy pass was taken without entropy, which the loss reads")
        return PolicyOutput(taken.logprobs, entropy, taken.values, taken.router_aux)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``(b, T)`` response log-probs under the reference (adapters off, or the frozen copy), with the LM
        head fused in exactly where the policy's forward fuses it (``fuses_policy_head``): in bfloat16 the
        fused head's float32 products round otherwise than the model's logits, and the KL of a policy that is
        still its reference must be 0."""
        with self.bank.reference():
            if self.fuses_policy_head():
                return self.fused_response_logprobs(rollout)[0]
            logits = self.rollout_logits(rollout)
        return self.response_logprobs(logits, rollout)

    # -- 5. update ----------------------------------------------------------------------------------

    def update(self, scored: ScoredRollout, targets: NamedTuple) -> dict[str, float]:
        """``update_epochs`` x ``num_mini_batches`` optimizer steps over the rollout; returns mean metrics."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        rows = scored.scores.shape[0]
        sums: dict[str, float] = defaultdict(float)
        count = skipped = 0
        loss_mask = self.step_weights(scored, targets)
        for _ in range(self.update_args.update_epochs):
            for micros in self.mini_batches(rows, scored.scores.device):
                step_rows = sum(m.numel() for m in micros)
                step_tokens = self.step_token_count(loss_mask[torch.cat(micros)])
                finite = True
                for i, micro in enumerate(micros):
                    batch = self.select(scored, targets, micro, step_rows=step_rows, step_tokens=step_tokens)
                    loss, metrics = self.policy_loss(batch)
                    # Every rank decides together: under DDP each manual_backward all-reduces gradients,
                    # so a rank leaving the loop alone would leave the others waiting.
                    if not every_rank(torch.isfinite(loss), loss.device):
                        finite = False
                        break
                    # Gradients are all-reduced once per step, on the last micro-batch (DDP no_sync before it).
                    with self.gradient_sync(i == len(micros) - 1):
                        self.manual_backward(loss * self.accumulation_weight(batch))
                    for name, value in metrics.items():
                        sums[name] += float(value)
                    count += 1
                if not finite:
                    # A non-finite loss never reaches the weights: drop this mini-batch's gradients.
                    log.warning("non-finite loss at rollout %d on some rank: optimizer step skipped on every rank",
                                self.rollout_count)
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.count_skipped_step()
                    continue
                if self.update_args.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.update_args.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
        # Each rank's mean over its micro-batches (as many on every rank), then over the ranks, as TRL
        # gathers its update metrics.
        reduced = global_means({name: (total / max(count, 1), count) for name, total in sums.items()}, self.device)
        means = {name: mean for name, (mean, _) in reduced.items()}
        if skipped:
            means["train/skipped_nonfinite"] = float(self.skipped_nonfinite)
        return means

    def mini_batches(self, rows: int, device) -> Iterator[list[torch.Tensor]]:
        """One pass over the rollout: shuffled mini-batches, each a list of micro-batch row indices.
        Groups of ``rows_kept_together`` consecutive rows stay in one micro-batch."""
        group = self.rows_kept_together
        within = torch.arange(group, device=device)
        args = self.update_args
        for mini in torch.randperm(rows // group, device=device).tensor_split(args.num_mini_batches):
            micros = [(m[:, None] * group + within).reshape(-1) for m in mini.tensor_split(args.gradient_accumulation_steps)]
            micros = [m for m in micros if m.numel()]
            if micros:
                yield micros

    @staticmethod
    def select(scored: ScoredRollout, targets: NamedTuple, index: torch.Tensor, *,
               step_rows: int | None = None, step_tokens: torch.Tensor | None = None) -> MiniBatch:
        """The micro-batch of rows ``index``. With the update's forward taken already (``scored.taken``) the one
        micro-batch holds every row: they stay in rollout order and the pass is not copied (losses sum over rows)."""
        in_order = scored.taken is not None and index.numel() == scored.scores.shape[0]

        def rows(x):
            return x if in_order else select_rows(x, index)

        return MiniBatch(
            rollout=rows(scored.rollout),
            old_logprobs=rows(scored.old_logprobs),
            ref_logprobs=rows(scored.ref_logprobs),
            targets=rows(targets),
            step_rows=index.numel() if step_rows is None else step_rows,
            step_tokens=step_tokens,
            taken=rows(scored.taken),
        )

    def step_token_count(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Loss tokens of one optimizer step, summed over ranks and divided by their number (a collective)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return global_sum(loss_mask.sum().float()) / world

    def gradient_sync(self, sync: bool):
        """No gradient all-reduce in this backward unless ``sync`` (DDP's ``no_sync``; a no-op elsewhere)."""
        strategy = self.trainer.strategy
        return nullcontext() if sync or not isinstance(strategy, ParallelStrategy) else strategy.block_backward_sync()

    # -- logging ------------------------------------------------------------------------------------

    PROGRESS_BAR_METRICS = ("objective/scores", "objective/kl")

    def log_rollout_metrics(self, metrics: dict, batch_size: int) -> None:
        """Log scalars once per rollout (``on_step``); each name may be logged once per step."""
        for name, value in metrics.items():
            self.log(name, float(value), on_step=True, on_epoch=False, batch_size=batch_size,
                     prog_bar=name in self.PROGRESS_BAR_METRICS)

    def maybe_log_samples(self, scored: ScoredRollout) -> None:
        """Every ``log_samples_every_n_rollouts`` rollouts, a table of prompts, completions and scores."""
        every = self.log_samples_every_n_rollouts
        if not every or (self.rollout_count - 1) % every != 0:
            return
        n = self.num_logged_samples
        self.last_samples = [(p, c, float(s)) for p, c, s in zip(scored.prompts[:n], scored.completions[:n], scored.scores[:n])]

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        table = "| prompt | completion | score |\n|---|---|---|\n" + "\n".join(
            f"| {cell(p)} | {cell(c)} | {s:.3f} |" for p, c, s in self.last_samples
        )
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("samples", table, self.rollout_count)
            elif hasattr(logger, "log_text"):  # W&B
                logger.log_text("samples", columns=["prompt", "completion", "score"], data=[list(r) for r in self.last_samples])

    # -- the bank and the Trainer ---------------------------------------------------------------------

    def required_adapters(self) -> list[AdapterSpec]:
        # A reward adapter is a judge, never trained here: the merge keeps trainable=False whatever the config says.
        frozen = [AdapterSpec(name, trainable=False, head="score") for name in self.rewards.adapter_names]
        return [AdapterSpec(self.policy_adapter)] + frozen

    def needs_reference(self) -> bool:
        return self.uses_reference()

    def generates_during_training(self) -> bool:
        return True

    def separate_reward_models(self) -> list[str]:
        sources = [s.config_source() for s in self.rewards.sources if isinstance(s, ModelReward)]
        return [source for source in sources if source]

    def configure_model(self) -> None:
        if self.bank is not None:
            return
        declared = {a.name: a for a in self.bank_spec.adapters}
        for name in self.rewards.adapter_names:
            if name not in declared or not declared[name].path:
                raise ValueError(
                    f"the reward source 'adapter' reads adapter {name!r}, so declare it with the path of a trained "
                    f"reward adapter under bank.adapters, e.g. {{name: {name}, path: runs/reward/.../export/adapter}}"
                )
        super().configure_model()
        if not self.bank_spec.disable_dropout:
            log.warning("bank.disable_dropout is false: the update's forward drops units the rollout's did not, so "
                        "the importance ratio is not 1 on the first update and clipping sees dropout noise")
        self.rewards.setup(self.bank, self.tokenizer)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Lightning calls setup before configure_model, so a bad split fails before any weights load.
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if stage == "fit" and batch_size is not None:
            self.check_rollout_split(batch_size)
        skipping = [spec.function or spec.adapter or spec.model for spec in self.reward_specs if spec.nonfinite == "skip"]
        if stage == "fit" and skipping and self.trainer.world_size > 1:
            # Dropped rows change each rank's number of optimizer steps, and every step is a collective.
            raise ValueError(f"reward nonfinite: skip ({skipping}) runs on one process only; under "
                             f"{self.trainer.world_size} processes use nonfinite: error")

    def check_rollout_split(self, batch_size: int) -> None:
        """A rollout of ``batch_size`` prompts must split into equal mini- and micro-batches."""
        args = self.update_args
        rows, parts = batch_size * self.num_samples_per_prompt, args.num_mini_batches * args.gradient_accumulation_steps
        if rows % parts:
            raise ValueError(
                f"a rollout of batch_size={batch_size} prompts x num_samples_per_prompt={self.num_samples_per_prompt} "
                f"= {rows} rows does not split into num_mini_batches={args.num_mini_batches} x "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps} = {parts} equal parts; make {rows} a "
                f"multiple of {parts}"
            )

    def total_optimizer_steps(self) -> int:
        # Lightning estimates rollouts (capped by max_steps); max_steps itself counts optimizer steps here, and
        # the run stops after the rollout that reaches it.
        steps = self.update_args.optimizer_steps(max(1, int(self.trainer.estimated_stepping_batches)))
        if self.trainer.max_steps == -1:
            return steps
        rollouts_to_max_steps = math.ceil(self.trainer.max_steps / self.update_args.optimizer_steps(1))
        return min(steps, self.update_args.optimizer_steps(rollouts_to_max_steps))

    # lit_rlhf.strategies reads these two of any method (DeepSpeed takes over clipping and accumulation).
    @property
    def gradient_accumulation_steps(self) -> int:
        return self.update_args.gradient_accumulation_steps

    @property
    def max_grad_norm(self) -> float | None:
        return self.update_args.max_grad_norm

    # -- validation: greedy responses to held-out prompts, scored -----------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.generate_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], self.train_sampling.greedy())
        _, reward = self.score_responses(rollout, list(batch["prompts"]), batch.get("raw_prompts"), update_stats=False)
        metrics = {"score": finite_mean(reward.scores),
                   "response_length": (rollout.response_lengths.float().mean(), rollout.response_ids.shape[0])}
        if len(reward.per_source) > 1:
            metrics |= {f"scores/{name}": finite_mean(value) for name, value in reward.per_source.items()}
        self.accumulate_evaluation_means(metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation_means("val", prog_bar=("score",))

    # -- checkpoints: rollout counter and reward statistics ------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_rlhf_online"] = {"rollout_count": self.rollout_count, "rewards": self.rewards.state_dict()}
        if self._sampling_seed is not None:
            # The run's own seed, not the resuming process's: a CLI run seeded at random (seed_everything: true)
            # draws a new seed each time it starts, and would sample other responses after the resume.
            checkpoint["lit_rlhf_online"]["sampling_seed"] = self._sampling_seed
        if self.kl_controller is not None:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lit_rlhf_online")
        if state is not None:
            self.rollout_count = int(state["rollout_count"])
            self.rewards.load_state_dict(state["rewards"])
            self._sampling_seed = state.get("sampling_seed", self._sampling_seed)
        if self.kl_controller is not None and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])


def finite_mean(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, count)`` of the finite ``values``: a response whose score was skipped (``nonfinite: skip``
    leaves it NaN) counts in no validation score."""
    finite = torch.isfinite(values)
    return torch.where(finite, values, 0.0).sum() / finite.sum().clamp(min=1), finite.sum()


def resolve_update_epochs(update_epochs: int, ppo_epochs: int | None) -> int:
    """``update_epochs``, or the deprecated ``ppo_epochs`` of earlier configs (the passes were never PPO's
    alone: GRPO, RLOO, BestOfN and OnlineDPO take them too)."""
    if ppo_epochs is None:
        return update_epochs
    if update_epochs not in (1, ppo_epochs):
        raise ValueError(f"ppo_epochs={ppo_epochs} and update_epochs={update_epochs} disagree: ppo_epochs is the old "
                         "name of update_epochs, give update_epochs only")
    warnings.warn("ppo_epochs is deprecated, renamed update_epochs (the passes over each rollout, for every online "
                  "method); give update_epochs instead", FutureWarning, stacklevel=3)
    return ppo_epochs
