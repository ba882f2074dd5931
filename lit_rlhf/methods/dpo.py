"""Offline preference optimisation: DPO and its family, SimPO, CPO (and CPO-SimPO), ORPO.

Every step runs ONE forward over chosen and rejected rows together (the collator stacks
them), takes the log-probs of the completion tokens only, and hands per-sequence sums to
the pure losses of ``lit_rlhf.losses.preference``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.distributed import global_means
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    CPOLossType,
    DPOLossType,
    FDivergence,
    check_beta,
    check_label_smoothing,
    check_loss_type,
    cpo_loss,
    dpo_loss,
    length_desensitized_logps,
    orpo_loss,
    simpo_loss,
    wpo_weights,
)
from lit_rlhf.methods.offline import OfflineMethod
from lit_rlhf.models import AdapterSpec, eval_mode

class PairLogps(NamedTuple):
    """Per-sequence completion log-probs of a preference batch; every field is (batch,).

    ``chosen_nll`` (mean NLL of the chosen completion's tokens) and ``wpo_weights`` are filled in
    only by the DPO options that need them (LD-DPO's reweighted sums, WPO).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_nll: torch.Tensor | None = None
    wpo_weights: torch.Tensor | None = None


class PreferenceMethod(OfflineMethod):
    """Shared forward, steps and metrics of the pairwise preference methods.

    A subclass defines ``compute_loss(batch) -> (scalar loss, metrics dict)`` with its loss. The ``val/`` and
    ``test/`` metrics are means over the epoch's pairs (every rank's, each once).
    """

    def pair_logps(self, batch: dict) -> PairLogps:
        """Log-probs of chosen and rejected completions from one forward of the active role."""
        logps, lengths = self.sequence_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        half = logps.shape[0] // 2
        return PairLogps(logps[:half], logps[half:], lengths[:half], lengths[half:])

    def policy_pair_logps(self, batch: dict) -> PairLogps:
        with self.trained_role():
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
        loss = self.add_router_aux_loss(loss)
        pairs = batch["input_ids"].shape[0] // 2
        # Every metric is a mean over the batch's pairs: logged over every rank's pairs, as TRL gathers them.
        means = global_means({"loss": (loss, pairs)} | {name: (value, pairs) for name, value in metrics.items()},
                             self.device)
        self.log_means(means, prog_bar=("loss", "rewards/accuracies"))
        return self.skip_if_nonfinite(loss)

    # Validation and test: every metric a mean over the epoch's pairs (of every rank, each once).

    def _evaluation_step(self, batch: dict) -> None:
        loss, metrics = self.compute_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        metrics = {name: (value, pairs) for name, value in metrics.items()}
        loss = self.evaluation_router_aux_loss(loss, metrics, pairs)
        self.accumulate_evaluation_means({"loss": (loss, pairs)} | metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation_means("val", prog_bar=("loss",))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation_means("test")


def mix_adapter_weights(bank, source: str, target: str, alpha: float) -> None:
    """``target ← α · source + (1 - α) · target`` on every parameter of adapter ``target`` (LoRA
    mode) or of the frozen reference copy (full mode, ``target`` ignored). TR-DPO's reference update,
    the one place it touches the bank's parameters.

    In full mode this is the paper's weight mixing exactly. With LoRA the factors ``A`` and ``B`` are
    mixed, which is the mix of the weight deltas ``BA`` only when α = 1 (a hard copy, TR-DPO's τ
    variant) or when both adapters share ``A``; otherwise it is a close approximation (the two
    adapters start equal and drift slowly), not an exact one.
    """
    with torch.no_grad():
        if bank.full:
            policy = dict(bank.model.named_parameters())
            for name, ref in bank.reference_model.named_parameters():
                ref.lerp_(policy[name].to(ref.dtype), alpha)
            return
        params = dict(bank.named_parameters())
        marker, source_marker = f".{target}.", f".{source}."
        mixed = 0
        for name, ref in params.items():
            if marker in name:
                ref.lerp_(params[name.replace(marker, source_marker)].to(ref.dtype), alpha)
                mixed += 1
        if not mixed:
            raise RuntimeError(f"the bank has no parameters of adapter {target!r} to mix into")


class DPO(PreferenceMethod):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its loss family.

    Args:
        beta: strength of the implicit KL constraint to the reference policy.
        loss_type: one loss type, or a list whose losses are summed with ``loss_weights`` (MPO, Wang
            et al. 2024, arXiv 2411.10442, e.g. ``[sigmoid, bco_pair, sft]``). ``sigmoid`` (DPO),
            ``ipo``, ``hinge``, ``robust``, ``bco_pair``, ``sppo_hard``, ``nca_pair``, ``apo_zero``,
            ``apo_down``, ``exo_pair``, ``aot``, ``aot_unpaired``, ``discopop``, ``sigmoid_norm``,
            ``sft`` (formulas and papers: ``lit_rlhf.losses.dpo_loss``).
        loss_weights: one weight per loss type; all 1 when ``None``.
        label_smoothing: probability that a preference label is flipped (``sigmoid`` as cDPO, which
            TRL 1.16 ignores there; ``sigmoid_norm``, ``robust``, ``exo_pair``, ``aot``).
        discopop_tau: τ of ``discopop``.
        f_divergence: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``
            (f-DPO, Wang et al. 2023, arXiv 2309.16240); refused with loss types where it is undefined.
        f_alpha: α of ``alpha_divergence``.
        rpo_alpha: weight of an NLL term on the chosen completion (RPO, Pang et al. 2024, arXiv
            2404.19733): the same as adding ``sft`` to ``loss_type`` with this weight.
        use_weighting: weight each pair by how likely the policy is to sample it (WPO, Zhou et al.
            2024, arXiv 2406.11827).
        ld_alpha: LD-DPO (Liu et al. 2024, arXiv 2409.06411): tokens beyond the shorter completion
            of a pair count ``ld_alpha`` times, in ``[0, 1]``; ``None`` is plain DPO.
        sync_ref_model: TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): every
            ``ref_model_sync_steps`` optimizer steps the reference moves toward the policy,
            ``ref ← α policy + (1-α) ref`` with ``α = ref_model_mixup_alpha``. The reference is then
            its own frozen adapter on the bank (``<policy_adapter>_reference``), a copy of the
            starting policy; in full mode the frozen copy of the base (see ``mix_adapter_weights``).
        ref_model_mixup_alpha: α of TR-DPO, in ``(0, 1]`` (1: hard copy).
        ref_model_sync_steps: τ of TR-DPO, optimizer steps between reference updates.
        reference_free: compare against a uniform reference (log-prob 0) instead of a model.
        precompute_ref_logps: compute the reference log-probs of every training and validation
            row once before training, so the reference never runs again (and, in ``full`` mode, no
            frozen copy of the base is kept).
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``padding_free`` of
            ``OfflineMethod``; ``router_aux_loss_coef``, the weight of a mixture of experts' router
            load-balancing loss in the training loss (``CompletionLogpsForward``; TRL's rule).
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: DPOLossType | list[DPOLossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        f_divergence: FDivergence = "reverse_kl",
        f_alpha: float = 0.5,
        rpo_alpha: float | None = None,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        reference_free: bool = False,
        precompute_ref_logps: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
        check_dpo_options(loss_types, weights, beta=beta, label_smoothing=label_smoothing,
                          discopop_tau=discopop_tau, f_divergence=f_divergence, rpo_alpha=rpo_alpha,
                          use_weighting=use_weighting, ld_alpha=ld_alpha)
        if rpo_alpha:
            loss_types, weights = loss_types + ["sft"], weights + [float(rpo_alpha)]
        if sync_ref_model:
            if reference_free or precompute_ref_logps:
                raise InvalidArgument("sync_ref_model", "DPO: sync_ref_model moves the reference during training, so it needs a live "
                                 "reference: drop reference_free and precompute_ref_logps")
            if not 0.0 < ref_model_mixup_alpha <= 1.0:
                raise InvalidArgument("ref_model_mixup_alpha",
                                      f"DPO: ref_model_mixup_alpha must be in (0, 1], got {ref_model_mixup_alpha}")
            if ref_model_sync_steps < 1:
                raise InvalidArgument("ref_model_sync_steps",
                                      f"DPO: ref_model_sync_steps must be >= 1, got {ref_model_sync_steps}")
        self.beta = beta
        self.loss_type = loss_type
        self.loss_terms = list(zip(loss_types, weights))
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.f_divergence = f_divergence
        self.f_alpha = f_alpha
        self.use_weighting = use_weighting
        self.ld_alpha = ld_alpha
        self.sync_ref_model = sync_ref_model
        self.ref_model_mixup_alpha = ref_model_mixup_alpha
        self.ref_model_sync_steps = ref_model_sync_steps
        self.reference_free = reference_free
        self.precompute_ref_logps = precompute_ref_logps
        # bco_pair's δ (Jung et al. 2024): the running mean of the batch-mean implicit rewards seen in training.
        self._bco_reward_sum = 0.0
        self._bco_batches = 0
        # TR-DPO: the reference adapter's weights from a checkpoint, applied once the bank exists.
        self._synced_reference: dict[str, torch.Tensor] | None = None
        self._last_sync_step = 0

    def needs_reference(self) -> bool:
        if self.sync_ref_model and self.bank_spec.train_mode != "full":
            # TR-DPO on adapters reads its own moving reference adapter: a frozen copy of the starting one
            # would never run. In full mode the bank's frozen copy is what moves.
            return False
        return not (self.reference_free or self.precompute_ref_logps)

    # -- TR-DPO: a reference that moves toward the policy ----------------------------------------

    @property
    def reference_adapter(self) -> str:
        return f"{self.policy_adapter}_reference"

    def required_adapters(self) -> list[AdapterSpec]:
        required = super().required_adapters()
        if self.sync_ref_model and self.bank_spec.train_mode != "full":
            # A policy loaded from a path: the reference loads the same adapter, so it has its config (rank, target
            # modules, a module it trains whole) and not the bank's `lora`, which a fresh adapter would take.
            start = next((a.path for a in self.bank_spec.adapters if a.name == self.policy_adapter), None)
            required.append(AdapterSpec(self.reference_adapter, path=start, trainable=False))
        return required

    def _reference_state(self) -> dict[str, torch.Tensor]:
        if self.bank.full:
            return {f"reference_model.{n}": p.detach().clone() for n, p in self.bank.reference_model.named_parameters()}
        marker = f".{self.reference_adapter}."
        return {n: p.detach().clone() for n, p in self.bank.named_parameters() if marker in n}

    def _start_synced_reference(self) -> None:
        """The moving reference starts as the starting policy, or as the checkpoint left it."""
        if self._synced_reference is None:
            mix_adapter_weights(self.bank, self.policy_adapter, self.reference_adapter, 1.0)
            return
        params = dict(self.bank.named_parameters())  # bank-relative names, as _reference_state wrote them
        with torch.no_grad():
            for name, value in self._synced_reference.items():
                params[name].copy_(value)
        self._synced_reference = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._sync_reference_if_due()

    def _sync_reference_if_due(self) -> None:
        """Mix the policy into the reference once at every ``ref_model_sync_steps``-th optimizer step."""
        step = self.trainer.global_step
        if self.sync_ref_model and step > self._last_sync_step and step % self.ref_model_sync_steps == 0:
            mix_adapter_weights(self.bank, self.policy_adapter, self.reference_adapter, self.ref_model_mixup_alpha)
            self._last_sync_step = step

    # -- reference log-probs computed once ------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.sync_ref_model:
            self._start_synced_reference()
        super().on_fit_start()

    def attach_precomputed_reference(self) -> None:
        if self.precompute_ref_logps:
            self.attach_reference_logps(("ref_chosen_logps", "ref_rejected_logps"), self._chosen_and_rejected_logps)

    def _chosen_and_rejected_logps(self, batch: dict) -> torch.Tensor:
        logps = self.pair_logps(batch)
        return torch.stack([logps.chosen, logps.rejected], dim=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bco_running_mean"] = (self._bco_reward_sum, self._bco_batches)
        if self.sync_ref_model:
            # Checkpoint callbacks save at their on_train_batch_end, before this module's: a sync due at this
            # step is done now, or a run resumed from here would never make it.
            self._sync_reference_if_due()
            checkpoint["tr_dpo_reference"] = {"weights": self._reference_state(), "last_sync_step": self._last_sync_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._bco_reward_sum, self._bco_batches = checkpoint.get("bco_running_mean", (0.0, 0))
        if "tr_dpo_reference" in checkpoint:
            self._synced_reference = checkpoint["tr_dpo_reference"]["weights"]
            self._last_sync_step = checkpoint["tr_dpo_reference"]["last_sync_step"]

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
        if self.sync_ref_model and not self.bank.full:
            # The moving reference is a frozen adapter: no gradient, no dropout.
            with torch.no_grad(), eval_mode(self.bank), self.bank.role(self.reference_adapter):
                return self.pair_logps(batch)
        with self.bank.reference():
            return self.pair_logps(batch)

    def pair_logps(self, batch: dict, *, with_weights: bool = False) -> PairLogps:
        """Log-probs of chosen and rejected from one forward of the active role; with LD-DPO
        (``ld_alpha``) the reweighted sums, with ``with_weights`` WPO's pair weights."""
        if self.ld_alpha is None and not with_weights:
            return super().pair_logps(batch)
        per_token, mask, log_sum_sq = self.completion_token_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_log_sum_sq=with_weights)
        half = per_token.shape[0] // 2
        lengths = mask.sum(dim=1)
        (chosen_tokens, rejected_tokens), (chosen_mask, rejected_mask) = per_token.split(half), mask.split(half)
        if self.ld_alpha is None:
            chosen, rejected = chosen_tokens.sum(dim=1), rejected_tokens.sum(dim=1)
        else:
            chosen, rejected = length_desensitized_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask,
                                                         self.ld_alpha)
        weights = None
        if with_weights:
            log_sum_sq = log_sum_sq.split(half)
            weights = wpo_weights(chosen_tokens, log_sum_sq[0], chosen_mask, rejected_tokens, log_sum_sq[1], rejected_mask)
        chosen_nll = -chosen_tokens.sum(dim=1) / lengths[:half].clamp(min=1)
        return PairLogps(chosen, rejected, lengths[:half], lengths[half:], chosen_nll, weights)

    def policy_pair_logps(self, batch: dict) -> PairLogps:
        with self.trained_role():
            return self.pair_logps(batch, with_weights=self.use_weighting)

    def compute_loss(self, batch: dict):
        reference = self.reference_pair_logps(batch)
        policy = self.policy_pair_logps(batch)
        chosen_nll = policy.chosen_nll
        if chosen_nll is None:
            chosen_nll = -policy.chosen / policy.chosen_lengths.clamp(min=1)
        bco_delta = 0.0
        if any(loss_type == "bco_pair" for loss_type, _ in self.loss_terms):
            bco_delta = self.bco_delta(self.beta * (policy.chosen - reference.chosen),
                                       self.beta * (policy.rejected - reference.rejected))
        total, rewards = 0.0, None
        for loss_type, weight in self.loss_terms:
            out = dpo_loss(
                policy.chosen,
                policy.rejected,
                reference.chosen,
                reference.rejected,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.label_smoothing,
                chosen_lengths=policy.chosen_lengths,
                rejected_lengths=policy.rejected_lengths,
                bco_delta=bco_delta,
                discopop_tau=self.discopop_tau,
                f_divergence=self.f_divergence,
                f_alpha=self.f_alpha,
                chosen_nll=chosen_nll,
            )
            losses = out.losses if policy.wpo_weights is None else out.losses * policy.wpo_weights
            total = total + weight * losses.mean()
            rewards = rewards or out
        metrics = self.pair_metrics(policy, rewards.chosen_rewards, rewards.rejected_rewards)
        if len(self.loss_terms) > 1:
            metrics["nll_loss"] = chosen_nll.detach().mean()
        return total, metrics


def check_dpo_options(loss_types: list[str], weights: list[float], *, beta: float, label_smoothing: float,
                      discopop_tau: float, f_divergence: str, rpo_alpha: float | None, use_weighting: bool,
                      ld_alpha: float | None) -> None:
    """DPO's arguments, checked at construction with the allowed values named."""
    if not loss_types:
        raise InvalidArgument("loss_type", "DPO: loss_type is an empty list; name at least one of "
                              + ", ".join(DPO_LOSS_TYPES))
    for loss_type in loss_types:
        check_loss_type(loss_type, DPO_LOSS_TYPES, "DPO")
    if len(weights) != len(loss_types):
        raise InvalidArgument("loss_weights", f"DPO: {len(weights)} loss_weights for {len(loss_types)} loss types "
                              f"{loss_types}")
    check_beta(beta, "DPO")
    check_label_smoothing(label_smoothing, "DPO")
    if discopop_tau <= 0:
        raise InvalidArgument("discopop_tau", f"DPO: discopop_tau must be > 0, got {discopop_tau}")
    if f_divergence not in F_DIVERGENCES:
        raise InvalidArgument("f_divergence", f"DPO: unknown f_divergence {f_divergence!r}; valid names are "
                              f"{', '.join(F_DIVERGENCES)}")
    undefined = [t for t in loss_types if t not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence != "reverse_kl" and undefined:
        raise InvalidArgument("f_divergence", f"DPO: f_divergence {f_divergence!r} is undefined for loss_type "
                              f"{undefined}; it applies to {', '.join(F_DIVERGENCE_LOSS_TYPES)}")
    if rpo_alpha is not None and rpo_alpha < 0:
        raise InvalidArgument("rpo_alpha", f"DPO: rpo_alpha must be >= 0, got {rpo_alpha}")
    if use_weighting and {"aot", "aot_unpaired"} & set(loss_types):
        raise InvalidArgument("use_weighting", "DPO: use_weighting (WPO) weighs each pair, but aot and aot_unpaired "
                              "sort the batch and lose the pairing")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise InvalidArgument("ld_alpha", f"DPO: ld_alpha must be in [0, 1], got {ld_alpha}")


class SimPO(PreferenceMethod):
    """Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734): no reference model.

    Args:
        beta: reward scale of the length-normalised log-probs.
        gamma_beta_ratio: target margin gamma as a fraction of beta.
        label_smoothing: probability that a preference label is flipped.
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``padding_free`` of
            ``OfflineMethod``; ``router_aux_loss_coef``, the weight of a mixture of experts' router
            load-balancing loss in the training loss (``CompletionLogpsForward``; TRL's rule).
    """

    def __init__(
        self,
        *,
        beta: float = 2.0,
        gamma_beta_ratio: float = 0.5,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_beta(beta, "SimPO")
        check_label_smoothing(label_smoothing, "SimPO")
        self.beta = beta
        self.gamma_beta_ratio = gamma_beta_ratio
        self.label_smoothing = label_smoothing

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
        alphapo_alpha: AlphaPO's reward shape (Gupta et al. 2025, arXiv 2501.03884): each
            log-prob ``ℓ`` becomes ``(1 - e^(-aℓ))/a``; 0 (default) is plain CPO. TRL's CPO calls
            it ``alpha`` (and our ``alpha``, the NLL weight, ``cpo_alpha``); TRL's ``alphapo``
            loss type is ``loss_type: simpo, alpha: 0, alphapo_alpha: a`` here.
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``padding_free`` of
            ``OfflineMethod``; ``router_aux_loss_coef``, the weight of a mixture of experts' router
            load-balancing loss in the training loss (``CompletionLogpsForward``; TRL's rule).
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        alpha: float = 1.0,
        loss_type: CPOLossType = "sigmoid",
        simpo_gamma: float = 0.5,
        label_smoothing: float = 0.0,
        alphapo_alpha: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_loss_type(loss_type, CPO_LOSS_TYPES, "CPO")
        check_beta(beta, "CPO")
        check_label_smoothing(label_smoothing, "CPO")
        if alpha < 0:
            raise InvalidArgument("alpha", f"CPO: alpha, the weight of the chosen completion's NLL, must be >= 0, "
                                  f"got {alpha}")
        self.beta = beta
        self.alpha = alpha
        self.loss_type = loss_type
        self.simpo_gamma = simpo_gamma
        self.label_smoothing = label_smoothing
        self.alphapo_alpha = alphapo_alpha

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
            alphapo_alpha=self.alphapo_alpha,
        )
        metrics = self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)
        metrics["nll_loss"] = chosen_nll.detach().mean()
        return out.losses.mean(), metrics


class ORPO(PreferenceMethod):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691): SFT on the chosen
    completion plus an odds-ratio penalty on the rejected one, in one stage, no reference model.

    Args:
        beta: weight λ of the odds-ratio term (the paper's λ; TRL's ``beta``).
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``padding_free`` of
            ``OfflineMethod``; ``router_aux_loss_coef``, the weight of a mixture of experts' router
            load-balancing loss in the training loss (``CompletionLogpsForward``; TRL's rule).
    """

    def __init__(self, *, beta: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        check_beta(beta, "ORPO")
        self.beta = beta

    def compute_loss(self, batch: dict):
        policy = self.policy_pair_logps(batch)
        out = orpo_loss(policy.chosen, policy.rejected, policy.chosen_lengths, policy.rejected_lengths, beta=self.beta)
        metrics = self.pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)
        metrics["nll_loss"] = (-policy.chosen / policy.chosen_lengths.clamp(min=1)).detach().mean()
        return out.losses.mean(), metrics
