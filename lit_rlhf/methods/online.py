"""What the online methods (PPO, RLOO, GRPO) share: rollout inside the step, manual optimization.

One ``training_step`` is one rollout:

1. ``rollout_and_score(batch)``: repeat each prompt ``num_samples_per_prompt`` times, sample
   responses from the policy adapter (``rollout/`` engine), score them (``rollout/rewards``),
   recompute the behaviour log-probs with one forward of the policy, and the reference's
   log-probs with adapters off -> ``ScoredRollout``;
2. ``compute_advantages(scored)`` (the subclass): per-row tensors for the update (advantages,
   returns, ...);
3. ``update(scored, data)``: ``ppo_epochs`` passes over ``num_mini_batches`` shuffled
   mini-batches, one optimizer step each, every mini-batch split into
   ``gradient_accumulation_steps`` micro-batches whose ``policy_loss(minibatch)`` (the
   subclass) is backpropagated with ``manual_backward``.

A subclass implements only ``compute_advantages`` and ``policy_loss`` (and, if its forward
also yields critic values, ``policy_logits_and_values``). Lightning rejects
``gradient_clip_val`` and ``accumulate_grad_batches`` on the Trainer in manual mode, so the
method takes ``max_grad_norm`` and ``gradient_accumulation_steps`` itself; the LR scheduler is
stepped by hand after every optimizer step. ``trainer.global_step`` counts optimizer steps; the
rollouts are counted apart (``rollout/count``).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
from lightning.pytorch.strategies import ParallelStrategy

from lit_rlhf.distributed import all_rows, every_rank, global_sum, rank_seed
from lit_rlhf.losses import entropy_from_logits, token_logps
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.models import AdapterSpec, eval_mode
from lit_rlhf.rollout import RewardOutput, RewardRequest, Rewards, RewardSpec, Rollout, SamplingConfig, build_engine

log = logging.getLogger("lit_rlhf.methods")


# -- what flows through a step ------------------------------------------------------------------


class ScoredRollout(NamedTuple):
    """One rollout with everything computed before the update. ``B`` = prompts x samples per
    prompt (prompt ``p``'s samples are rows ``p*k .. p*k+k-1``), ``T`` = longest response.

    Attributes:
        rollout: ids and masks (``Rollout``).
        prompts: ``B`` rendered prompt strings.
        completions: ``B`` response texts (stop token removed).
        scores: ``(B,)`` float32 reward of each response (normalised, weighted, clipped, EOS rule).
        old_logprobs: ``(B, T)`` float32 log-probs of the response tokens under the policy at
            rollout time (0 on padding).
        ref_logprobs: ``(B, T)`` the same under the reference; ``None`` when the method needs none.
        old_values: ``(B, T)`` critic values at rollout time when the policy forward yields them
            (a value head on the policy trunk), else ``None``.
        raw_scores: ``{source: (B,)}`` each reward source's raw score.
    """

    rollout: Rollout
    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None
    raw_scores: dict[str, torch.Tensor]


class MiniBatch(NamedTuple):
    """The rows of one micro-batch; ``b`` rows, ``T`` response tokens.

    Attributes:
        rollout: the rows' ``Rollout``.
        scores: ``(b,)``.
        old_logprobs: ``(b, T)``.
        ref_logprobs: ``(b, T)`` or ``None``.
        old_values: ``(b, T)`` or ``None``.
        data: what ``compute_advantages`` returned, each tensor's rows selected.
        step_rows: rows of the optimizer step this micro-batch belongs to (its mini-batch, on this rank).
        step_tokens: loss tokens of that optimizer step summed over every rank and divided by the
            number of ranks (DDP averages gradients), scalar; the normaliser of a global token-level loss.
    """

    rollout: Rollout
    scores: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None
    data: dict[str, torch.Tensor]
    step_rows: int = 0
    step_tokens: torch.Tensor | None = None


class PolicyOutput(NamedTuple):
    """One forward of the policy over rollout rows. All ``(b, T)`` float32, 0 on padding.

    Attributes:
        logprobs: log-probs of the response tokens (temperature applied as when sampling).
        entropy: per-token entropy of the policy, when asked for.
        values: critic values at the positions predicting each response token, when the forward yields them.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None


# -- KL coefficient control ------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """Update from one rollout's per-sequence KL ``(B,)`` (a no-op here; see ``AdaptiveKLController``)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2), steering the KL to a target:

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        β_{t+1} = β_t (1 + K_β e_t),   K_β = n_steps / horizon

    Args:
        kl_coef: initial β.
        target: ``KL_target`` (nats per sequence).
        horizon: samples over which β may change by about ``e^{±0.2}``.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """``update`` from the mean KL and the count of the sequences of every rank (a collective), so
        β stays the same on every rank under DDP; TRL likewise steps by the global batch size."""
        kl = all_rows(kl_per_sequence)
        self.update(kl.float().mean().item(), n_steps=kl.shape[0])

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}


def kl_controller(kl_coef: float, *, adaptive: bool, target: float, horizon: int) -> FixedKLController:
    """The KL coefficient's controller: fixed, or adaptive towards ``target`` (Ziegler et al. 2019)."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)


# -- the base ------------------------------------------------------------------------------------


class OnlineMethod(BankMethod, metaclass=ABCMeta):
    """Base of the online methods: rollout -> score -> reference log-probs -> advantages -> update.

    Subclasses implement:

    - ``compute_advantages(scored: ScoredRollout) -> dict[str, Tensor]``: per-row tensors (first
      dim ``B``) the update needs, e.g. ``{"advantages": (B,) or (B, T)}``; log rollout metrics
      with ``self.log_rollout_metrics``.
    - ``policy_loss(batch: MiniBatch) -> tuple[Tensor, dict[str, Tensor]]``: the scalar loss of a
      micro-batch (mean over its rows/tokens) and detached metrics; use ``self.policy_forward``.

    Args:
        rewards: the reward sources (``RewardSpec``), e.g.
            ``[{kind: function, function: "lit_rlhf.toy:reward"}]``.
        sampling: how responses are sampled during training (validation decodes greedily with
            the same ``max_new_tokens``).
        engine: the rollout engine's registered name: ``auto`` (``hf_static`` on CUDA; see
            ``lit_rlhf.rollout.engine.AutoEngine``), ``hf``, ``hf_static``, or one you register.
        num_samples_per_prompt: responses sampled per prompt (``k``; RLOO and GRPO need ``k >= 2``).
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass; each takes ``B / num_mini_batches`` rows.
        gradient_accumulation_steps: micro-batches per mini-batch (backward each, step once).
        max_grad_norm: clip the gradient norm of each step to this; ``None`` for no clipping.
        reward_clip: clip the combined reward to ``[-reward_clip, reward_clip]``.
        missing_eos_penalty: subtracted from the reward of responses cut at ``max_new_tokens``.
        missing_eos_score: replaces the reward of such responses.
        log_samples_every_n_rollouts: log a table of sample completions every this many rollouts
            (TensorBoard text); 0 never.
        num_logged_samples: rows in that table.
        policy_adapter: the adapter trained as the policy (several may live on one bank).
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    #: A method with a KL penalty sets it; its state then travels in checkpoints.
    kl_controller: FixedKLController | None = None

    def __init__(
        self,
        *,
        rewards: list[RewardSpec] | None = None,
        sampling: SamplingConfig | None = None,
        engine: str = "auto",
        num_samples_per_prompt: int = 1,
        ppo_epochs: int = 1,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        missing_eos_score: float | None = None,
        log_samples_every_n_rollouts: int = 10,
        num_logged_samples: int = 8,
        policy_adapter: str = "policy",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not rewards:
            raise ValueError(
                "an online method needs reward sources, e.g. rewards: [{kind: function, function: 'lit_rlhf.toy:reward'}]"
            )
        for name, value in (("num_samples_per_prompt", num_samples_per_prompt), ("ppo_epochs", ppo_epochs),
                            ("num_mini_batches", num_mini_batches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.automatic_optimization = False
        self.reward_specs = [RewardSpec(**r) if isinstance(r, dict) else r for r in rewards]
        self.sampling = sampling or SamplingConfig()
        # Plain types only in hparams: checkpoints are read back with torch.load(weights_only=True).
        self.hparams["rewards"] = [asdict(r) for r in self.reward_specs]
        self.hparams["sampling"] = asdict(self.sampling)
        self.rewards = Rewards(self.reward_specs, clip=reward_clip, missing_eos_penalty=missing_eos_penalty,
                               missing_eos_score=missing_eos_score)
        self.engine = build_engine(engine)
        self.num_samples_per_prompt = num_samples_per_prompt
        self.ppo_epochs = ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.log_samples_every_n_rollouts = log_samples_every_n_rollouts
        self.num_logged_samples = num_logged_samples
        self.policy_adapter = policy_adapter
        self.rollout_count = 0
        self._sampling_seed: int | None = None  # seed_everything's seed, read at the first rollout
        self.last_samples: list[tuple[str, str, float]] = []

    # -- what subclasses implement ----------------------------------------------------------------

    @abstractmethod
    def compute_advantages(self, scored: ScoredRollout) -> dict[str, torch.Tensor]:
        """Per-row tensors (first dim ``B``) the update needs; see the class docstring."""

    @abstractmethod
    def policy_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of a micro-batch and detached metrics; see the class docstring."""

    def uses_reference(self) -> bool:
        """Whether the reference's log-probs are computed for each rollout."""
        return True

    #: Consecutive rows the update never separates (2 for a method whose loss compares the two samples of a prompt).
    rows_kept_together: int = 1

    def accumulation_weight(self, batch: MiniBatch) -> float:
        """Factor on a micro-batch's loss before backward. By default its share of the step's rows,
        so the step sees the mean over the mini-batch; a loss already normalised by the whole step
        (``batch.step_tokens``) returns 1."""
        return batch.rollout.response_ids.shape[0] / batch.step_rows

    def policy_logits_and_values(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the policy over whole sequences, and critic values if the same pass gives them."""
        with self.bank.role(self.policy_adapter):
            return self.bank(input_ids, attention_mask, position_ids).logits, None

    # -- bank ------------------------------------------------------------------------------------

    def required_adapters(self) -> list[AdapterSpec]:
        frozen = [AdapterSpec(name, trainable=False, head="score") for name in self.rewards.adapter_names]
        return [AdapterSpec(self.policy_adapter)] + frozen

    def needs_reference(self) -> bool:
        return self.uses_reference()

    def generates_during_training(self) -> bool:
        return True

    def configure_model(self) -> None:
        if self.bank is not None:
            return
        frozen = set(self.rewards.adapter_names)
        declared = {a.name: a for a in self.bank_spec.adapters}
        for name in frozen:
            if name not in declared or not declared[name].path:
                raise ValueError(
                    f"the reward source 'adapter' reads adapter {name!r}, so declare it with the path of a trained "
                    f"reward adapter under bank.adapters, e.g. {{name: {name}, path: runs/reward/.../export/adapter}}"
                )
        # A reward adapter is a judge, never trained here, whatever `trainable` the config left at its default.
        self.bank_spec = replace(
            self.bank_spec, adapters=[replace(a, trainable=False) if a.name in frozen else a for a in self.bank_spec.adapters]
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
        rows, parts = batch_size * self.num_samples_per_prompt, self.num_mini_batches * self.gradient_accumulation_steps
        if rows % parts:
            raise ValueError(
                f"a rollout of batch_size={batch_size} prompts x num_samples_per_prompt={self.num_samples_per_prompt} "
                f"= {rows} rows does not split into num_mini_batches={self.num_mini_batches} x "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} = {parts} equal parts; make {rows} a "
                f"multiple of {parts}"
            )

    def total_optimizer_steps(self) -> int:
        rollouts = max(1, int(self.trainer.estimated_stepping_batches))
        return rollouts * self.ppo_epochs * self.num_mini_batches

    @property
    def train_sampling(self) -> SamplingConfig:
        return self.sampling.resolved(self.tokenizer)

    # -- rollout -----------------------------------------------------------------------------------

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

    def rollout_and_score(self, batch: dict) -> ScoredRollout:
        """Sample ``num_samples_per_prompt`` responses per prompt, score them, and compute the
        behaviour and reference log-probs (no gradient)."""
        rollout, prompts, completions, reward = self.drop_unscored(*self.sample_and_score(batch))
        if not prompts:  # every prompt had an unscored sample: training_step makes no update
            empty = torch.zeros(rollout.response_ids.shape, dtype=torch.float32, device=rollout.response_ids.device)
            return ScoredRollout(rollout, prompts, completions, reward.scores, empty, None, None, reward.per_source)
        # Behaviour log-probs in eval mode too: with dropout (LoRA dropout > 0) the first PPO ratio would not be 1.
        with torch.no_grad(), eval_mode(self.bank):
            # Recomputed rather than read from generate: its scores are post-warping (temperature, top-k/p).
            behaviour = self.policy_forward(rollout)
            ref_logprobs = self.reference_logprobs(rollout) if self.uses_reference() else None
        return ScoredRollout(rollout, prompts, completions, reward.scores, behaviour.logprobs, ref_logprobs,
                             behaviour.values, reward.per_source)

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

    # -- log-probs: one path (lit_rlhf.losses.token_logps) --------------------------------------------

    def response_logits(self, logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """The logits that predict each response token, divided by the sampling temperature. ``(b, T, vocab)``."""
        start = rollout.prompt_ids.shape[1] - 1
        logits = logits[:, start : start + rollout.response_ids.shape[1]]
        temperature = self.sampling.temperature
        return logits / temperature if temperature != 1.0 else logits

    def response_logprobs(self, logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """``(b, T)`` float32 log-probs of the response tokens from whole-sequence logits, 0 on padding."""
        logps = token_logps(self.response_logits(logits, rollout), rollout.response_ids)
        return logps * rollout.response_mask

    def response_slice(self, per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Per-position values of whole sequences -> the positions predicting response tokens. ``(b, T)``."""
        start = rollout.prompt_ids.shape[1] - 1
        return per_position[:, start : start + rollout.response_ids.shape[1]] * rollout.response_mask

    def policy_forward(self, rollout: Rollout, *, with_entropy: bool = False) -> PolicyOutput:
        """One forward of the policy over the rows: response log-probs (+ entropy, + values if the pass gives them)."""
        logits, values = self.policy_logits_and_values(rollout.input_ids, rollout.attention_mask, rollout.position_ids)
        logprobs = self.response_logprobs(logits, rollout)
        entropy = None
        if with_entropy:
            entropy = entropy_from_logits(self.response_logits(logits, rollout)) * rollout.response_mask
        if values is not None:
            values = self.response_slice(values, rollout)
        return PolicyOutput(logprobs, entropy, values)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``(b, T)`` response log-probs under the reference (adapters off, or the frozen copy)."""
        with self.bank.reference():
            logits = self.bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids).logits
        return self.response_logprobs(logits, rollout)

    # -- update ------------------------------------------------------------------------------------

    @staticmethod
    def select(scored: ScoredRollout, data: dict[str, torch.Tensor], index: torch.Tensor, *,
               step_rows: int | None = None, step_tokens: torch.Tensor | None = None) -> MiniBatch:
        def rows(t):
            return None if t is None else t[index]

        return MiniBatch(scored.rollout.select(index), scored.scores[index], scored.old_logprobs[index],
                         rows(scored.ref_logprobs), rows(scored.old_values), {k: v[index] for k, v in data.items()},
                         index.numel() if step_rows is None else step_rows, step_tokens)

    def step_token_count(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Loss tokens of one optimizer step, summed over ranks and divided by their number (a collective)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return global_sum(loss_mask.sum().float()) / world

    def mini_batches(self, rows: int, device) -> Iterator[list[torch.Tensor]]:
        """One pass over the rollout: shuffled mini-batches, each a list of micro-batch row indices.
        Groups of ``rows_kept_together`` consecutive rows stay in one micro-batch."""
        group = self.rows_kept_together
        within = torch.arange(group, device=device)
        for mini in torch.randperm(rows // group, device=device).tensor_split(self.num_mini_batches):
            micros = [(m[:, None] * group + within).reshape(-1) for m in mini.tensor_split(self.gradient_accumulation_steps)]
            micros = [m for m in micros if m.numel()]
            if micros:
                yield micros

    def update(self, scored: ScoredRollout, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """``ppo_epochs`` x ``num_mini_batches`` optimizer steps over the rollout; returns mean metrics."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        rows = scored.scores.shape[0]
        sums: dict[str, float] = defaultdict(float)
        count = skipped = 0
        loss_mask = data.get("loss_mask", scored.rollout.response_mask)
        for _ in range(self.ppo_epochs):
            for micros in self.mini_batches(rows, scored.scores.device):
                step_rows = sum(m.numel() for m in micros)
                step_tokens = self.step_token_count(loss_mask[torch.cat(micros)])
                finite = True
                for i, micro in enumerate(micros):
                    batch = self.select(scored, data, micro, step_rows=step_rows, step_tokens=step_tokens)
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
                if self.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
        means = {name: total / max(count, 1) for name, total in sums.items()}
        if skipped:
            means["train/skipped_nonfinite"] = float(self.skipped_nonfinite)
        return means

    # -- the step --------------------------------------------------------------------------------

    def gradient_sync(self, sync: bool):
        """No gradient all-reduce in this backward unless ``sync`` (DDP's ``no_sync``; a no-op elsewhere)."""
        strategy = self.trainer.strategy
        return nullcontext() if sync or not isinstance(strategy, ParallelStrategy) else strategy.block_backward_sync()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        scored = self.rollout_and_score(batch)
        if not scored.prompts:  # nothing was scored (nonfinite: skip dropped every prompt)
            self.rollout_count += 1
            return
        data = self.compute_advantages(scored)
        metrics = self.update(scored, data)
        self.rollout_count += 1
        metrics.update(self.rollout_metrics(scored))
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["rollout/count"] = float(self.rollout_count)
        self.log_rollout_metrics(metrics, batch_size=scored.scores.shape[0])
        self.maybe_log_samples(scored)

    def rollout_metrics(self, scored: ScoredRollout) -> dict[str, float]:
        rollout = scored.rollout
        metrics = {
            "objective/scores": scored.scores.mean().item(),
            "response_length": rollout.response_lengths.float().mean().item(),
            "rollout/ended_with_eos": rollout.ended.float().mean().item(),
            "rollout/episodes": float(self.rollout_count * scored.scores.shape[0]),
        }
        if len(scored.raw_scores) > 1:
            metrics.update({f"objective/scores/{name}": v.mean().item() for name, v in scored.raw_scores.items()})
        return metrics

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

    # -- validation: greedy responses to held-out prompts, scored -----------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.generate_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], self.train_sampling.greedy())
        _, reward = self.score_responses(rollout, list(batch["prompts"]), batch.get("raw_prompts"), update_stats=False)
        size = rollout.response_ids.shape[0]
        self.log("val/score", reward.scores.nanmean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/response_length", rollout.response_lengths.float().mean(), batch_size=size, sync_dist=True)
        if len(reward.per_source) > 1:
            for name, value in reward.per_source.items():
                self.log(f"val/scores/{name}", value.mean(), batch_size=size, sync_dist=True)

    # -- checkpoints: rollout counter and reward statistics ------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_rlhf_online"] = {"rollout_count": self.rollout_count, "rewards": self.rewards.state_dict()}
        if self.kl_controller is not None:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lit_rlhf_online")
        if state is not None:
            self.rollout_count = int(state["rollout_count"])
            self.rewards.load_state_dict(state["rewards"])
        if self.kl_controller is not None and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
