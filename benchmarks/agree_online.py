"""Differential check of the online methods' losses against TRL's, on identical fixed rollouts.

Not a test (TRL is not a test dependency): run it where the ``bench`` extra is installed,

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agree_online.py

Each row feeds the same rollout (rewards, masks with a row cut at the length limit, old / reference /
new per-token log-probs, entropies) to our function and to TRL 1.16's own code: ``GRPOTrainer._compute_loss``
and ``RLOOTrainer._compute_loss`` on a trainer built without ``__init__`` whose forward returns the given
log-probs, ``GKDTrainer.generalized_jsd_loss``; TRL's advantage lines (inside
``_generate_and_score_completions``) are written out step by step with TRL's own ``nanstd``. It prints
the largest absolute difference of each quantity (loss, its gradient, logged metrics). The differences
that are by design are printed as such, with the relation that holds instead.

``--lora`` instead trains LoRA adapters (r 8, alpha 16, all linear layers) on the toy base: each of GRPO, RLOO,
Online DPO and PPO fits one rollout through Lightning (one AdamW step: decay 0.5, clipping 0.05; GRPO also four
steps, two epochs x two mini-batches), from a fresh adapter (reference: the base, adapters off) and from a loaded
SFT adapter (reference: its frozen copy; TRL: a ``PeftModel`` with GRPOTrainer's ``ref`` copy, or Online DPO's
``create_reference_model``); TRL's side gets the recorded rollout on a peft model built apart from the same weights
and compares behaviour / reference log-probs, KL, advantages, loss, clipped LoRA gradients and the weights after the
step (see "LoRA mode" below).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agree_online.py --lora

``--moe`` compares GRPO's and RLOO's router load-balancing loss with TRL's on a tiny Mixtral (``moe_checks``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agree_online.py --moe --all
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer
from trl import GRPOTrainer, RLOOTrainer
from trl.experimental.gkd import GKDTrainer
from trl.trainer.utils import nanstd

from lit_rlhf.losses import (generalized_jsd_loss, group_advantages, grpo_loss, ppo_policy_loss, ppo_value_loss,
                             rloo_advantages)
from lit_rlhf.methods.gkd import GKD, rollout_batch
from lit_rlhf.methods.grpo import GRPO
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, PolicyOutput, ScoredRollout
from lit_rlhf.methods.online_dpo import OnlineDPO
from lit_rlhf.methods.ppo import PPO
from lit_rlhf.methods.rloo import RLOO, RLOOTargets
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.bank import eval_mode
from lit_rlhf.rollout import Rollout, SamplingConfig, truncate_at_stop
from lit_rlhf.toy.families import build_tiny
from tests.methods.online_helpers import first_batch, make_online, perturbed
from tests.methods.tiny_families import move_off_reference

ROWS: list[tuple[str, str, float, str]] = []


def check(method: str, what: str, ours: torch.Tensor, theirs: torch.Tensor, note: str = "", tol: float = 1e-6) -> None:
    diff = (torch.as_tensor(ours, dtype=torch.float64) - torch.as_tensor(theirs, dtype=torch.float64)).abs().max().item()
    verdict = "agree" if diff <= tol else "DIFFERS"
    ROWS.append((method, what, diff, verdict + (f" ({note})" if note else "")))


class _Accelerator:
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _stub(cls, logps: torch.Tensor, entropies: torch.Tensor, **attributes):
    """A TRL trainer without ``__init__``: its forward hands back ``logps`` (a leaf, so gradients compare)."""

    class Stub(cls):
        current_gradient_accumulation_steps = attributes.pop("gradient_accumulation_steps", 1)

        def __init__(self):
            pass

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
            return self._logps, self._entropies, None

    stub = Stub()
    stub.__dict__.update(accelerator=_Accelerator(), model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)),
                         aux_loss_enabled=False, _logps=logps, _entropies=entropies, **attributes)
    return stub


def rollout(seed: int = 0, prompts: int = 3, k: int = 4, T: int = 6):
    """A fixed rollout: rows of every length, some cut at ``T`` without EOS (mask all ones)."""
    g = torch.Generator().manual_seed(seed)
    B = prompts * k
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[5] = T, T  # cut at the limit
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g) * 3
    new = old + torch.randn(B, T, generator=g) * 0.3  # ratios well outside [0.8, 1.2] on some tokens
    ref = old + torch.randn(B, T, generator=g) * 0.2
    # Padding holds garbage on purpose: neither side may read it.
    old, new, ref = (torch.where(mask.bool(), x, torch.full_like(x, 7.0)) for x in (old, new, ref))
    rewards = torch.randint(0, 3, (B,), generator=g).float()
    rewards[k : 2 * k] = 1.0  # one flat group
    entropies = torch.rand(B, T, generator=g) * 2
    return SimpleNamespace(B=B, k=k, T=T, mask=mask, old=old, new=new, ref=ref, rewards=rewards, entropies=entropies,
                           prompt_ids=torch.ones(B, 2, dtype=torch.long), completion_ids=torch.ones(B, T, dtype=torch.long))


# -- GRPO -----------------------------------------------------------------------------------------


def trl_group_advantages(rewards: torch.Tensor, k: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16 ``_generate_and_score_completions``, ``sum_then_normalize``, one reward function."""
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


def grpo_checks() -> None:

    r = rollout()
    for scale in ("group", "batch", "none"):
        batch_std = r.rewards.std() if scale == "batch" else None
        ours = group_advantages(r.rewards, r.k, scale_rewards=scale, batch_std=batch_std)
        theirs, zero_std = trl_group_advantages(r.rewards, r.k, scale)
        check("GRPO", f"advantages scale_rewards={scale}", ours.advantages, theirs)
        if scale != "batch":
            check("GRPO", f"frac_reward_zero_std ({scale})", ours.zero_std.float().mean(), zero_std.float().mean())
    advantages = group_advantages(r.rewards, r.k).advantages
    max_len = r.T + 2
    cases = [dict(loss_type=t, beta=b, epsilon_high=h, delta=d, importance_sampling_level=lvl)
             for t in ("grpo", "bnpo", "dr_grpo", "dapo") for b in (0.0, 0.04) for h in (None, 0.28)
             for d, lvl in ((None, "token"), (1.5, "token"), (None, "sequence"))]
    for case in cases:
        for accumulation in (1, 2):
            name = (f"{case['loss_type']} beta={case['beta']} eps_high={case['epsilon_high']} delta={case['delta']} "
                    f"{case['importance_sampling_level']} GA={accumulation}")
            _grpo_case(GRPOTrainer, r, advantages, max_len, case, accumulation, name)


def _grpo_case(GRPOTrainer, r, advantages, max_len, case, accumulation, name) -> None:
    eps, high = 0.2, case["epsilon_high"]
    micro = torch.arange(r.B).tensor_split(accumulation)
    step_tokens = r.mask.sum().float()
    ours_new = r.new.clone().requires_grad_(True)
    theirs_new = r.new.clone().requires_grad_(True)
    ours_total, theirs_total = 0.0, 0.0
    ours_metrics, theirs_metrics = defaultdict(list), defaultdict(list)
    for rows in micro:
        m = r.mask[rows]
        out = grpo_loss(ours_new[rows], r.old[rows], advantages[rows], m, epsilon=eps, epsilon_high=high,
                        beta=case["beta"], ref_logprobs=r.ref[rows], loss_type=case["loss_type"],
                        max_completion_length=max_len, num_tokens=step_tokens,
                        importance_sampling_level=case["importance_sampling_level"], delta=case["delta"])
        weight = 1.0 if case["loss_type"] == "dapo" else rows.numel() / r.B
        ours_total = ours_total + out.loss * weight
        ours_metrics["clip"].append(out.clipfrac)
        ours_metrics["kl"].append(out.kl)

        stub = _stub(GRPOTrainer, theirs_new[rows], r.entropies[rows], gradient_accumulation_steps=accumulation,
                     top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                     importance_sampling_level=case["importance_sampling_level"], beta=case["beta"],
                     args=SimpleNamespace(use_bias_correction_kl=False, delta=case["delta"],
                                          steps_per_generation=accumulation),
                     loss_type=case["loss_type"], epsilon_low=eps, epsilon_high=eps if high is None else high,
                     use_vllm=False, max_completion_length=max_len, _entropy_bonus_enabled=False)
        inputs = dict(prompt_ids=r.prompt_ids[rows], prompt_mask=torch.ones_like(r.prompt_ids[rows]),
                      completion_ids=r.completion_ids[rows], completion_mask=m, advantages=advantages[rows],
                      old_per_token_logps=r.old[rows], ref_per_token_logps=r.ref[rows],
                      num_items_in_batch=step_tokens)
        theirs_total = theirs_total + stub._compute_loss(None, inputs)
        for key, values in stub._metrics["train"].items():
            theirs_metrics[key].extend(values)
    ours_total.backward()
    theirs_total.backward()
    check("GRPO", f"loss {name}", ours_total.detach(), theirs_total.detach())
    mask = r.mask.bool()
    check("GRPO", f"grad {name}", ours_new.grad[mask], theirs_new.grad[mask])
    sequence = case["importance_sampling_level"] == "sequence"
    check("GRPO", f"policy/clipfrac vs clip_ratio/region_mean {name}", torch.stack(ours_metrics["clip"]).mean(),
          torch.tensor(theirs_metrics["clip_ratio/region_mean"]).mean(),
          note="by design: a fraction of tokens; TRL counts sequences at the sequence level" if sequence else "")
    if case["beta"] > 0:
        check("GRPO", f"objective/kl vs kl {name}", torch.stack(ours_metrics["kl"]).mean(),
              torch.tensor(theirs_metrics["kl"]).mean())


def grpo_dapo_steps_checks() -> None:
    """``dapo`` with two optimizer steps per rollout (our ``num_mini_batches: 2``, TRL's ``steps_per_generation: 2``):
    ours divides each step by its own tokens, TRL by the rollout's tokens over the number of steps."""
    r = rollout(seed=7)
    advantages = group_advantages(r.rewards, r.k).advantages
    total = r.mask.sum().float()
    for step, rows in enumerate(torch.arange(r.B).tensor_split(2)):
        own = r.mask[rows].sum().float()
        ours = grpo_loss(r.new[rows], r.old[rows], advantages[rows], r.mask[rows], loss_type="dapo", num_tokens=own)
        stub = _stub(GRPOTrainer, r.new[rows], r.entropies[rows], gradient_accumulation_steps=1, top_entropy_quantile=1.0,
                     off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
                     args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=2),
                     loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, max_completion_length=r.T,
                     _entropy_bonus_enabled=False)
        inputs = dict(prompt_ids=r.prompt_ids[rows], prompt_mask=torch.ones_like(r.prompt_ids[rows]),
                      completion_ids=r.completion_ids[rows], completion_mask=r.mask[rows], advantages=advantages[rows],
                      old_per_token_logps=r.old[rows], num_items_in_batch=total)
        theirs = stub._compute_loss(None, inputs)
        check("GRPO", f"dapo, optimizer step {step} of 2 per rollout", ours.loss, theirs,
              note="by design: each step over its own tokens; TRL over the steps' mean token count")
        check("GRPO", f"dapo, optimizer step {step} of 2 per rollout, x own tokens / mean tokens", ours.loss * own,
              theirs * total / 2)


def grpo_entropy_bonus_checks() -> None:
    """The entropy bonus (TRL ``entropy_coef``) under gradient accumulation, per loss type."""

    r = rollout(seed=1)
    advantages = group_advantages(r.rewards, r.k).advantages
    coef = 0.1
    varied = r.mask
    for loss_type, accumulation, equal in [(t, a, e) for t in ("grpo", "bnpo", "dapo") for a in (1, 2)
                                           for e in (False, True)]:
        r.mask = torch.ones_like(varied) if equal else varied
        micro = torch.arange(r.B).tensor_split(accumulation)
        entropy_ours = r.entropies.clone().requires_grad_(True)
        ours_total = 0.0
        theirs_total = 0.0
        theirs_new = r.new.clone().requires_grad_(True)
        entropy_theirs = r.entropies.clone().requires_grad_(True)
        for rows in micro:
            out = grpo_loss(r.new[rows], r.old[rows], advantages[rows], r.mask[rows], loss_type=loss_type,
                            num_tokens=r.mask.sum().float(), entropy=entropy_ours[rows], entropy_coef=coef)
            ours_total = ours_total + out.loss * (1.0 if loss_type == "dapo" else rows.numel() / r.B)
            stub = _stub(GRPOTrainer, theirs_new[rows], entropy_theirs[rows], gradient_accumulation_steps=accumulation,
                         top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                         beta=0.0, args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                                        steps_per_generation=accumulation),
                         loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, use_vllm=False,
                         max_completion_length=r.T, _entropy_bonus_enabled=True, entropy_coef=coef,
                         use_adaptive_entropy=False)
            inputs = dict(prompt_ids=r.prompt_ids[rows], prompt_mask=torch.ones_like(r.prompt_ids[rows]),
                          completion_ids=r.completion_ids[rows], completion_mask=r.mask[rows],
                          advantages=advantages[rows], old_per_token_logps=r.old[rows],
                          num_items_in_batch=r.mask.sum().float())
            theirs_total = theirs_total + stub._compute_loss(None, inputs)
        ours_total.backward()
        theirs_total.backward()
        mask = r.mask.bool()
        by_design = loss_type == "dapo" and accumulation > 1 and not equal
        check("GRPO", f"entropy-bonus grad {loss_type} GA={accumulation} equal tokens per micro-batch={equal}",
              entropy_ours.grad[mask], entropy_theirs.grad[mask],
              note="by design: dapo's bonus is the step's token mean; TRL weighs each micro-batch's mean 1/GA"
              if by_design else "")


def grpo_method_checks() -> None:
    """GRPO's own ``policy_loss`` on a real rollout of the toy model, micro-batch by micro-batch, against TRL's
    ``_compute_loss`` fed the same rows and the same forward: loss and the gradient of every LoRA parameter.
    The policy is moved after the rollout (as after an earlier optimizer step), so ratios are not 1."""
    for options in (dict(loss_type="grpo", beta=0.04), dict(loss_type="bnpo", epsilon_high=0.28),
                    dict(loss_type="dr_grpo", beta=0.04), dict(loss_type="dapo", mask_truncated_completions=True),
                    dict(loss_type="dapo", beta=0.04, importance_sampling_level="sequence", delta=1.5),
                    dict(loss_type="bnpo", top_entropy_quantile=0.5),
                    dict(loss_type="dapo", entropy_coef=0.1)):
        pl.seed_everything(0, verbose=False)
        method = perturbed(make_online(GRPO, max_new_tokens=6, **options))
        scored = method.rollout_and_score(first_batch(method, batch_size=2))
        targets = method.compute_advantages(scored)
        with torch.no_grad():
            for name, p in method.bank.named_parameters():
                if "lora_A" in name and ".policy." in name:
                    p.add_(torch.randn_like(p) * 0.05)
        method.bank.eval()
        params = [p for p in method.bank.parameters() if p.requires_grad]
        rows = torch.arange(scored.scores.shape[0])
        micros = [rows[:4], rows[4:]]  # two equal micro-batches of one optimizer step (check_rollout_split)
        loss_mask = method.loss_mask(scored.rollout)
        step_tokens = loss_mask.sum().float()
        ours, theirs = 0.0, 0.0
        for micro in micros:
            batch = method.select(scored, targets, micro, step_rows=rows.numel(), step_tokens=step_tokens)
            loss, _ = method.policy_loss(batch)
            ours = ours + loss * method.accumulation_weight(batch)
            out = method.policy_forward(batch.rollout, with_entropy=True)
            high = method.epsilon if method.epsilon_high is None else method.epsilon_high
            stub = _stub(GRPOTrainer, out.logprobs, out.entropy, gradient_accumulation_steps=len(micros),
                         top_entropy_quantile=method.top_entropy_quantile, off_policy_mask_threshold=None,
                         importance_sampling_level=method.importance_sampling_level, beta=method.beta,
                         args=SimpleNamespace(use_bias_correction_kl=False, delta=method.delta,
                                              steps_per_generation=len(micros)),
                         loss_type=method.loss_type, epsilon_low=method.epsilon, epsilon_high=high, use_vllm=False,
                         max_completion_length=method.sampling.max_new_tokens,
                         _entropy_bonus_enabled=method.entropy_coef > 0, entropy_coef=method.entropy_coef,
                         use_adaptive_entropy=False)
            r = batch.rollout
            completion_mask = r.response_mask
            if method.mask_truncated_completions:  # TRL zeroes the truncated rows' completion mask
                completion_mask = completion_mask * r.ended[:, None].long()
            inputs = dict(prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, completion_ids=r.response_ids,
                          completion_mask=completion_mask, advantages=batch.targets.advantages,
                          old_per_token_logps=batch.old_logprobs, ref_per_token_logps=batch.ref_logprobs,
                          num_items_in_batch=step_tokens)
            theirs = theirs + stub._compute_loss(None, inputs)
        ours_grads = torch.autograd.grad(ours, params)
        theirs_grads = torch.autograd.grad(theirs, params)
        name = " ".join(f"{k}={v}" for k, v in options.items())
        note = "by design: dapo's entropy bonus is the step's token mean (see above)" if "entropy_coef" in options else ""
        check("GRPO", f"method loss, {name}", ours.detach(), theirs.detach(), note=note)
        check("GRPO", f"method LoRA grads, {name}", torch.cat([g.flatten() for g in ours_grads]),
              torch.cat([g.flatten() for g in theirs_grads]), note=note)


# -- RLOO -----------------------------------------------------------------------------------------


def trl_rloo_advantages(rewards, seq_kl, beta, k, normalize):
    """TRL 1.16 ``RLOOTrainer._generate_and_score_completions``: KL in the reward, leave-one-out, normalise."""

    rewards = rewards - beta * seq_kl
    grouped = rewards.view(-1, k)
    baselines = ((grouped.nansum(dim=1, keepdim=True) - grouped) / (k - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - advantages.nanmean()) / (nanstd(advantages) + 1e-4)
    return advantages


def rloo_checks() -> None:

    r = rollout(seed=2)
    beta = 0.05
    seq_kl = ((r.old - r.ref) * r.mask).sum(1)  # TRL: k1 of the rollout-time log-probs, summed per sequence

    scored = ScoredRollout(Rollout(r.prompt_ids, torch.ones_like(r.prompt_ids), r.completion_ids, r.mask, r.mask.all(1)),
                           [""] * r.B, [""] * r.B, r.rewards, {}, old_logprobs=r.old * r.mask,
                           ref_logprobs=r.ref * r.mask)

    def advantages(normalize):  # RLOO.compute_advantages itself, on a stand-in for the method's state
        rloo = SimpleNamespace(kl_in_reward=True, kl_estimator="k1", kl_controller=SimpleNamespace(value=beta),
                               num_samples_per_prompt=r.k, normalize_advantages=normalize)
        rloo.sequence_kl = lambda scored: OnlineMethod.sequence_kl(rloo, scored)
        return RLOO.compute_advantages(rloo, scored).advantages

    ours = advantages(False)
    check("RLOO", "advantages (KL in reward, k1)", ours, trl_rloo_advantages(r.rewards, seq_kl, beta, r.k, False))
    ours_norm = advantages(True)
    check("RLOO", "advantages normalize_advantages", ours_norm,
          trl_rloo_advantages(r.rewards, seq_kl, beta, r.k, True), note="by design: eps 1e-8 on the variance (as PPO's whitening); TRL 1e-4 on the std",
          tol=1e-6)
    # The loss: TRL's ratio is per sequence, exp(sum_t logp - sum_t old), one clipped term per sequence, mean over
    # sequences. Ours is per token, a token mean over the step.
    for name, new in (("on-policy (ratio 1)", r.old), ("off-policy", r.new)):
        ours_new = new.clone().requires_grad_(True)
        theirs_new = new.clone().requires_grad_(True)
        out = ppo_policy_loss(ours_new, r.old, ours, r.mask, clip_range=0.2)
        out.loss.backward()
        stub = _stub(RLOOTrainer, theirs_new, r.entropies, epsilon_low=0.2, epsilon_high=0.2)
        inputs = dict(prompt_ids=r.prompt_ids, prompt_mask=torch.ones_like(r.prompt_ids), completion_ids=r.completion_ids,
                      completion_mask=r.mask, advantages=ours, old_logps=(r.old * r.mask).sum(1))
        stub._compute_loss(None, inputs).backward()
        mask = r.mask.bool()
        scale = r.B / r.mask.sum()
        check("RLOO", f"grad x mean length, {name}", ours_new.grad[mask] / scale, theirs_new.grad[mask],
              note="by design: token-level ratio and token mean; TRL sequence ratio and sequence mean")


def rloo_kl_in_loss_checks() -> None:
    """``RLOO.policy_loss`` with ``kl_in_reward: false`` (its forward standing in for the given log-probs). TRL's
    RLOOTrainer has no KL loss term; its nearest formula is GRPO's ``dapo`` with ``beta``: the token-level clipped
    surrogate plus β k3 per token over the step's tokens, which ours should be."""
    r = rollout(seed=8)
    advantages = rloo_advantages(r.rewards, r.k)
    beta = 0.05
    for accumulation in (1, 2):
        ours_new = r.new.clone().requires_grad_(True)
        theirs_new = r.new.clone().requires_grad_(True)
        rloo = SimpleNamespace(kl_in_reward=False, kl_controller=SimpleNamespace(value=beta), cliprange=0.2,
                               epsilon_high=None, importance_sampling_level="token")
        step_tokens = r.mask.sum().float()
        ours, theirs = 0.0, 0.0
        ours_entropy, theirs_entropy = [], []
        for rows in torch.arange(r.B).tensor_split(accumulation):
            m = r.mask[rows]
            new, entropy = ours_new[rows] * m, r.entropies[rows] * m
            rloo.policy_forward = lambda rollout, with_entropy, taken, new=new, entropy=entropy: PolicyOutput(
                new, entropy, None)
            batch = MiniBatch(Rollout(r.prompt_ids[rows], torch.ones_like(r.prompt_ids[rows]), r.completion_ids[rows], m,
                                      m.all(1)),
                              r.old[rows] * m, r.ref[rows] * m, RLOOTargets(advantages[rows], r.rewards[rows]),
                              step_rows=r.B, step_tokens=step_tokens)
            loss, metrics = RLOO.policy_loss(rloo, batch)
            ours = ours + loss  # RLOO.accumulation_weight is 1
            ours_entropy.append(metrics["policy/entropy"])
            stub = _stub(GRPOTrainer, theirs_new[rows], r.entropies[rows], gradient_accumulation_steps=accumulation,
                         top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                         beta=beta, args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                                         steps_per_generation=accumulation),
                         loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, max_completion_length=r.T,
                         _entropy_bonus_enabled=False)
            inputs = dict(prompt_ids=r.prompt_ids[rows], prompt_mask=torch.ones_like(r.prompt_ids[rows]),
                          completion_ids=r.completion_ids[rows], completion_mask=m, advantages=advantages[rows],
                          old_per_token_logps=r.old[rows], ref_per_token_logps=r.ref[rows],
                          num_items_in_batch=step_tokens)
            theirs = theirs + stub._compute_loss(None, inputs)
            theirs_entropy.extend(stub._metrics["train"]["entropy"])
        ours.backward()
        theirs.backward()
        mask = r.mask.bool()
        check("RLOO", f"policy/entropy vs entropy, GA={accumulation}", torch.stack(ours_entropy).mean(),
              torch.tensor(theirs_entropy).mean())
        check("RLOO", f"kl_in_reward=false loss vs TRL GRPO dapo + beta, GA={accumulation}", ours.detach(),
              theirs.detach())
        check("RLOO", f"kl_in_reward=false grad vs TRL GRPO dapo + beta, GA={accumulation}", ours_new.grad[mask],
              theirs_new.grad[mask])


# -- PPO ------------------------------------------------------------------------------------------
# TRL 1.16 has no PPOTrainer; its last one (trl/trainer/ppo_trainer.py at a08e713, TRL 0.2x) is written out
# below step by step: rewards, GAE, whitening, losses.


def trl_masked_whiten(x, mask, shift_mean=True):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl_ppo_targets(scores, logprobs, ref_logprobs, values, last, kl_coef, gamma, lam, whiten_rewards, p1=True,
                    kl_estimator="k1"):
    """``last``: index of each response's last token (TRL's ``sequence_lengths``). ``p1=False`` moves TRL's score
    from the position after the last token onto it (and its value mask with it): our placement."""
    B, T = logprobs.shape
    idx = torch.arange(T).repeat(B, 1)
    padding_mask = idx > last[:, None]
    padding_mask_p1 = idx > (last + int(p1))[:, None]
    logprobs = logprobs.masked_fill(padding_mask, 1.0)  # INVALID_LOGPROB
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, 1.0)
    values = values.masked_fill(padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    end = torch.where(last + 1 < T, last + 1, last) if p1 else last
    rewards[torch.arange(B), end] += scores
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, (~padding_mask_p1).float(), shift_mean=False).masked_fill(padding_mask_p1, 0)
    lastgaelam, reversed_ = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], dim=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, (~padding_mask).float()).masked_fill(padding_mask, 0)
    return advantages, returns, values, padding_mask, padding_mask_p1


def trl_ppo_losses(new_logprobs, old_logprobs, advantages, vpred, values, returns, padding_mask, padding_mask_p1,
                   cliprange, cliprange_value):
    new_logprobs = new_logprobs.masked_fill(padding_mask, 1.0)
    old_logprobs = old_logprobs.masked_fill(padding_mask, 1.0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf1, vf2 = (vpred - returns) ** 2, (vpredclipped - returns) ** 2

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf2 > vf1).float(), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg1, pg2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), ~padding_mask)
    pg_clipfrac = masked_mean((pg2 > pg1).float(), ~padding_mask)
    return pg_loss, pg_clipfrac, vf_loss, vf_clipfrac


def ppo_checks() -> None:

    r = rollout(seed=4)
    g = torch.Generator().manual_seed(5)
    values = torch.randn(r.B, r.T, generator=g)
    vpred = values + torch.randn(r.B, r.T, generator=g) * 0.3
    beta, gamma, lam = 0.05, 1.0, 0.95
    for subset, rows in (("rows cut at the length limit", r.mask.all(1)), ("rows ended by EOS", ~r.mask.all(1))):
        mask, lengths = r.mask[rows], r.mask[rows].sum(1)
        scores, old, ref, new = r.rewards[rows], r.old[rows], r.ref[rows], r.new[rows]
        v, vp = values[rows] * mask, vpred[rows] * mask
        for whiten_rewards, kl_estimator in ((False, "k1"), (True, "k1"), (False, "k3")):
            # PPO.compute_advantages itself, on a stand-in for the method's state.
            ppo = SimpleNamespace(kl_estimator=kl_estimator, kl_controller=SimpleNamespace(value=beta), gamma=gamma, lam=lam,
                                  whiten_rewards=whiten_rewards)
            ppo.token_rewards = lambda scored, kl, ppo=ppo: PPO.token_rewards(ppo, scored, kl)
            b = int(rows.sum())
            ids = torch.ones(b, r.T, dtype=torch.long)
            scored = ScoredRollout(Rollout(ids[:, :2], torch.ones(b, 2, dtype=torch.long), ids, mask, ~mask.all(1)),
                                   [""] * b, [""] * b, scores, {}, old_logprobs=old * mask, ref_logprobs=ref * mask,
                                   old_values=v)
            targets = PPO.compute_advantages(ppo, scored)
            adv, returns = targets.advantages, targets.returns
            t_adv, t_returns, t_values, pm, pm1 = trl_ppo_targets(scores, old, ref, values[rows], lengths - 1, beta,
                                                                  gamma, lam, whiten_rewards, kl_estimator=kl_estimator)
            note = "" if subset.startswith("rows cut") else (
                "by design: the score on the EOS token; TRL puts it one position after, on padding")
            name = f"{subset}, whiten_rewards={whiten_rewards}, kl_estimator={kl_estimator}"
            check("PPO", f"advantages, {name}", adv[mask.bool()], t_adv[mask.bool()], note=note, tol=1e-5)
            check("PPO", f"returns, {name}", returns[mask.bool()], t_returns[mask.bool()], note=note, tol=1e-5)
            if note:
                moved = trl_ppo_targets(scores, old, ref, values[rows], lengths - 1, beta, gamma, lam, whiten_rewards,
                                        p1=False, kl_estimator=kl_estimator)
                check("PPO", f"advantages, {name}, TRL's score moved onto the EOS", adv[mask.bool()],
                      moved[0][mask.bool()], tol=1e-5)
                check("PPO", f"returns, {name}, TRL's score moved onto the EOS", returns[mask.bool()],
                      moved[1][mask.bool()], tol=1e-5)
                continue
            ours_pg = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
            ours_vf = ppo_value_loss(vp, v, returns, mask, clip_range_value=0.2)
            pg, pg_clip, vf, vf_clip = trl_ppo_losses(new, old, t_adv, vpred[rows], t_values, t_returns, pm, pm1,
                                                      0.2, 0.2)
            check("PPO", f"policy loss, {name}", ours_pg.loss, pg, tol=1e-6)
            check("PPO", f"policy/clipfrac, {name}", ours_pg.clipfrac, pg_clip)
            check("PPO", f"value loss, {name}", ours_vf.loss, vf, tol=1e-6)
            check("PPO", f"value/clipfrac, {name}", ours_vf.clipfrac, vf_clip)
            # PPO.policy_loss itself, its forwards standing in for the given log-probs and values.
            ppo.__dict__.update(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, critic="adapter",
                       policy_forward=lambda rollout, with_entropy, taken, new=new: PolicyOutput(new, new * 0, None),
                       critic_values=lambda rollout, vp=vp: vp)
            batch = MiniBatch(scored.rollout, old * mask, None, targets)
            loss, metrics = PPO.policy_loss(ppo, batch)
            check("PPO", f"method loss (policy + vf_coef x value), {name}", loss, pg + 0.1 * vf, tol=1e-6)


# -- GKD ------------------------------------------------------------------------------------------


def gkd_checks() -> None:

    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, 11, generator=g)
    teacher = torch.randn(3, 5, 11, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temperature in (1.0, 0.7):
            s1 = student.clone().requires_grad_(True)
            s2 = student.clone().requires_grad_(True)
            ours = generalized_jsd_loss(s1, teacher, mask, beta=beta, temperature=temperature, reduction="mean")
            theirs = GKDTrainer.generalized_jsd_loss(s2, teacher, labels=labels, beta=beta, temperature=temperature)
            ours.backward()
            theirs.backward()
            check("GKD", f"JSD beta={beta} T={temperature}", ours.detach(), theirs.detach(), tol=1e-5)
            check("GKD", f"JSD grad beta={beta} T={temperature}", s1.grad, s2.grad, tol=1e-6)


# -- Online DPO -----------------------------------------------------------------------------------


def trl_online_dpo_loss(rewards, logps_sum, ref_sum, beta, loss_type):
    """TRL 1.16 ``OnlineDPOTrainer.training_step``: rows are ``[first samples; second samples]``."""
    n = rewards.numel() // 2
    first, second = rewards.split(n)
    first_chosen = first >= second
    batch = torch.arange(n)
    chosen, rejected = batch + (~first_chosen * n), batch + (first_chosen * n)
    logits = (logps_sum[chosen] - logps_sum[rejected]) - (ref_sum[chosen] - ref_sum[rejected])
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * logits)).mean()
    return ((logits - 1 / (2 * beta)) ** 2).mean()


def online_dpo_checks() -> None:
    """``OnlineDPO.policy_loss`` itself, its forward standing in for the given log-probs (no ties: TRL takes the
    first sample as chosen on a tie, ours gives the pair weight 0, documented)."""
    r = rollout(seed=6, prompts=4, k=2)
    r.rewards = torch.tensor([1.0, 0.0, 0.2, 0.7, 3.0, -1.0, 0.0, 0.5])
    for loss_type in ("sigmoid", "ipo"):
        new = r.new.clone().requires_grad_(True)
        dpo = SimpleNamespace(beta=0.1, loss_type=loss_type, label_smoothing=0.0)
        dpo.policy_forward = lambda rollout, taken=None, new=new: PolicyOutput(new * r.mask, None, None)
        targets = OnlineDPO.compute_advantages(None, SimpleNamespace(scores=r.rewards))
        rows = Rollout(r.prompt_ids, torch.ones_like(r.prompt_ids), r.completion_ids, r.mask, r.mask.all(1))
        ours, _ = OnlineDPO.policy_loss(dpo, MiniBatch(rows, None, r.ref * r.mask, targets))
        # TRL's layout: the first sample of every prompt, then the second.
        order = torch.cat([torch.arange(0, r.B, 2), torch.arange(1, r.B, 2)])
        theirs = trl_online_dpo_loss(r.rewards[order], (new * r.mask).sum(1)[order], (r.ref * r.mask).sum(1)[order],
                                     0.1, loss_type)
        note = "by design: ipo on length-normalised log-ratios, as our (and TRL's) offline DPO; TRL's Online DPO sums"
        note = note if loss_type == "ipo" else ""
        check("OnlineDPO", f"loss {loss_type}", ours.detach(), theirs.detach(), note=note)
        ours_grad, = torch.autograd.grad(ours, new, retain_graph=True)
        theirs_grad, = torch.autograd.grad(theirs, new)
        check("OnlineDPO", f"grad {loss_type}", ours_grad, theirs_grad, note=note)
        if loss_type == "ipo":
            lengths = r.mask.sum(1)[order]
            normalised = trl_online_dpo_loss(r.rewards[order], (new * r.mask).sum(1)[order] / lengths,
                                             (r.ref * r.mask).sum(1)[order] / lengths, 0.1, loss_type)
            check("OnlineDPO", "loss ipo, TRL's formula on length-normalised log-probs", ours.detach(),
                  normalised.detach())


def gkd_method_checks() -> None:
    """GKD's rows of generated completions and its loss, against TRL's ``generate_on_policy_outputs`` (fed the same
    generated ids by a stand-in ``generate``) and ``compute_loss``, on a tiny llama (rotary: TRL passes no position
    ids, which only absolute positions would notice) whose pad token is its EOS."""
    with tempfile.TemporaryDirectory() as root:
        path = build_tiny("llama", f"{root}/llama")
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(path)
        pl.seed_everything(0, verbose=False)
        for beta in (0.0, 0.5, 1.0):
            method = GKD(bank=BankSpec(model=path, lora=LoraSpec(r=4, alpha=8)), lmbda=1.0, beta=beta, engine="hf",
                         sampling=SamplingConfig(max_new_tokens=6))
            method.configure_model()
            move_off_reference(method.bank, "lora")
            method.bank.eval()
            eos = method.tokenizer.eos_token_id
            prompt_ids = torch.tensor([[eos, eos, 10, 11, 12], [20, 21, 22, 23, 24], [eos, eos, eos, 30, 31]])
            prompt_mask = (torch.arange(5) >= torch.tensor([[2], [0], [3]])).long()
            # Rows: EOS mid-response then pad (= EOS); no EOS (cut at the limit); EOS first.
            generated = torch.tensor([[40, 41, eos, eos, eos, eos], [42, 43, 44, 45, 46, 47], [eos, eos, eos, eos, eos, eos]])
            rows = rollout_batch(truncate_at_stop(prompt_ids, prompt_mask, generated, [eos], eos))
            fake = SimpleNamespace(generate=lambda **kw: SimpleNamespace(sequences=torch.cat([prompt_ids, generated], 1)))
            ids, attention, labels = GKDTrainer.generate_on_policy_outputs(
                fake, {"prompts": prompt_ids, "prompt_attention_mask": prompt_mask}, SimpleNamespace(eos_token_id=eos))
            check("GKD", f"attention mask of generated rows (pad = EOS), beta={beta}", rows.attention_mask, attention)
            check("GKD", f"loss tokens of generated rows (pad = EOS), beta={beta}", rows.completion_mask,
                  (labels != -100).long())
            student, teacher, mask = method.aligned_logits(rows)
            ours = method.divergence(student, teacher, mask, beta=beta, temperature=1.0)

            def student_forward(**kw):
                with method.bank.role(method.policy_adapter):
                    return method.bank.model(**kw)

            class Teacher:
                def eval(self):
                    return self

                def __call__(self, **kw):
                    with method.bank.teacher():
                        return method.bank.model(**kw)

            stub = GKDTrainer.__new__(GKDTrainer)
            stub.__dict__.update(teacher_model=Teacher(), beta=beta)
            theirs = stub.compute_loss(student_forward, {"input_ids": ids, "attention_mask": attention, "labels": labels})
            check("GKD", f"method loss on generated rows, beta={beta}", ours.detach(), theirs.detach(), tol=1e-6)


# -- LoRA mode (--lora) ---------------------------------------------------------------------------
# Each method fits one rollout here through Lightning (one optimizer step: update_epochs 1, one mini-batch), its
# rollout recorded; TRL's side gets that same rollout on a peft model built independently from the same weights
# (a fresh adapter: get_peft_model + the starting LoRA copied in; a loaded SFT adapter: PeftModel.from_pretrained
# and TRL's "ref" copy of it, as GRPOTrainer.__init__ makes one), its log-probs from TRL's own fused forward
# (``_get_per_token_logps_and_entropies``, reference through TRL's ``use_adapter``), its loss from TRL's code, then
# clipping and one AdamW step as transformers' Trainer takes them. Compared: behaviour and reference log-probs,
# KL, advantages, loss, the clipped LoRA gradients, the LoRA weights after the step.

LORA_R, LORA_ALPHA = 8, 16  # make_online's adapters
LORA_OPTIM = dict(learning_rate=1e-2, weight_decay=0.5, max_grad_norm=0.05)
ADAM_EPS = 1e-8


def _canonical(name: str, adapter: str) -> str:
    name = name.split("base_model.model.", 1)[1]
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def _lora_tensors(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """``adapter``'s trained tensors: its LoRA matrices and its whole copies of ``modules_to_save``."""
    return {_canonical(n, adapter): p for n, p in model.named_parameters() if f".{adapter}." in n
            and ("lora_" in n or ".modules_to_save." in n)}


def _saved_sft_adapter(root: str, modules_to_save: list[str] | None = None) -> str:
    """An SFT adapter saved by peft (as TRL's SFTTrainer leaves one), its LoRA away from zero; ``modules_to_save``:
    trained whole (TRL's SFT does so for the LM head when tokens are added), moved off the base too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.paths import TOY_BASE

    torch.manual_seed(8)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TOY_BASE),
                           LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                      task_type="CAUSAL_LM", modules_to_save=modules_to_save))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
            elif ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.3)
    path = f"{root}/sft{'_' + '_'.join(modules_to_save) if modules_to_save else ''}"
    model.save_pretrained(path)
    return path


def _saved_reward_adapter(root: str) -> str:
    """A reward adapter (LoRA + score head) as lit_rlhf's Reward method saves one, weights away from zero."""
    from lit_rlhf.models import AdapterBank, AdapterSpec
    from tests.paths import TOY_BASE

    bank = AdapterBank(BankSpec(model=TOY_BASE, lora=LoraSpec(r=LORA_R, alpha=LORA_ALPHA)),
                       require=[AdapterSpec("reward", head="score")])
    torch.manual_seed(9)
    with torch.no_grad():
        for n, p in bank.named_parameters():
            if "lora_" in n or n.startswith("heads."):
                p.copy_(torch.randn_like(p) * 0.3)
    bank.save_adapter("reward", f"{root}/reward")
    return f"{root}/reward"


class _Recorded:
    """Our fit of one rollout: the scored rollout, its targets, the loss, the applied (clipped) gradients."""

    def __init__(self, method):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.grads: dict[int, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []
        self.metrics: list[dict[str, torch.Tensor]] = []
        self._handle = register_optimizer_step_post_hook(self._step)
        for name in ("rollout_and_score", "compute_advantages", "policy_loss"):
            inner = getattr(method, name)
            setattr(method, name, self._wrap(name, inner))
        self.micro_batches: list[list[torch.Tensor]] = []
        mini_batches = method.mini_batches

        def recorded_mini_batches(rows, device):
            for micros in mini_batches(rows, device):
                self.micro_batches.append([m.clone() for m in micros])
                yield micros

        method.mini_batches = recorded_mini_batches

    def _wrap(self, name, inner):
        def recorded(*args, **kwargs):
            out = inner(*args, **kwargs)
            if name == "policy_loss":
                self.losses.append(out[0].detach())
                self.metrics.append({k: torch.as_tensor(v).detach() for k, v in out[1].items()})
            else:
                setattr(self, name, out)
            return out

        return recorded

    def _step(self, optimizer, args, kwargs):
        self.grads = {id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                      if p.grad is not None}
        self._handle.remove()


def _fit_ours(cls, *, sft_dir=None, reward_dir=None, options=None):
    """Our method on the toy base in LoRA mode, its starting LoRA set, and one rollout fitted (one optimizer step)."""
    from lit_rlhf.models import AdapterSpec
    from lit_rlhf.rollout import RewardSpec
    from tests.methods.online_helpers import TOY_REWARD, prompts, trainer

    options = dict(options or {})
    adapters = [AdapterSpec("policy", path=sft_dir)] if sft_dir else []
    rewards = [TOY_REWARD]
    if reward_dir:
        adapters.append(AdapterSpec("reward", path=reward_dir))
        rewards = [RewardSpec("adapter", adapter="reward")]
    temperature = options.pop("temperature", 0.7)
    checkpointing = options.pop("gradient_checkpointing", False)
    steps = dict(update_epochs=options.pop("update_epochs", 1), num_mini_batches=options.pop("num_mini_batches", 1))
    method = make_online(cls, adapters=adapters, rewards=rewards, **steps,
                         sampling=SamplingConfig(max_new_tokens=6, temperature=temperature), **LORA_OPTIM, **options)
    method.bank_spec.gradient_checkpointing = checkpointing
    method.configure_model()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in method.bank.named_parameters():
            if "lora_" in name and ".policy." in name and not sft_dir:  # a fresh adapter, moved off the base
                p.copy_(torch.randn_like(p) * 0.3)
            elif "lora_" in name and ".value." in name:
                p.copy_(torch.randn_like(p) * 0.3)
    start = {k: p.detach().clone() for k, p in _lora_tensors(method.bank.model, "policy").items()}
    value_start = {k: p.detach().clone() for k, p in _lora_tensors(method.bank.model, "value").items()}
    record = _Recorded(method)
    heads = [h for h in method.bank.heads.values() if h.kind == "value"]
    if heads:
        record.head_start = [p.detach().clone() for p in heads[0].linear.parameters()]
    pl.seed_everything(0, verbose=False)
    trainer(1).fit(method, prompts(batch_size=2))
    return method, record, start, value_start, temperature


def _trl_policy(start: dict, sft_dir: str | None, temperature: float, ref_adapter: bool = True):
    """TRL's policy: the same base with TRL's fused LM head, the same adapter; loaded: plus TRL's ``ref`` copy."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tests.paths import TOY_BASE

    base = AutoModelForCausalLM.from_pretrained(TOY_BASE)
    add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy"))
    if sft_dir:
        model = PeftModel.from_pretrained(base, sft_dir, is_trainable=True)
    if sft_dir and ref_adapter:
        # GRPOTrainer.__init__, a PeftModel with beta != 0: a frozen "ref" copy of the loaded adapter.
        model.add_adapter("ref", model.peft_config["default"])
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
                model.get_parameter(name.replace(".default.", ".ref.")).requires_grad_(False)
    if not sft_dir:
        model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    theirs = _lora_tensors(model, "default")
    assert set(theirs) == set(start), (sorted(set(theirs) ^ set(start)))[:4]
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(start[key])
    model.train()
    return model, theirs


class _TRLForward:
    """TRL's forward of the policy and of its reference on a rollout (GRPOTrainer's own code)."""

    def __init__(self, model, rollout, temperature):
        from trl.trainer.utils import use_adapter

        self.model, self.rollout, self.use_adapter = model, rollout, use_adapter
        self.stub = GRPOTrainer.__new__(GRPOTrainer)
        self.stub.__dict__.update(accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True), temperature=temperature,
                                  args=SimpleNamespace(report_to=[]))

    def logps(self, *, grad=False, entropy=False):
        r = self.rollout
        with torch.set_grad_enabled(grad):
            logps, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self.stub, self.model, r.input_ids, r.attention_mask, r.response_ids.shape[1], compute_entropy=entropy)
        return (logps * r.response_mask, ent) if entropy else logps * r.response_mask

    def ref_logps(self):
        with self.use_adapter(self.model, adapter_name="ref" if "ref" in self.model.peft_config else None):
            return self.logps()


def _trl_step(theirs: dict, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """backward, clipping and one AdamW step as transformers' Trainer takes them (LoRA matrices decayed); returns
    the clipped gradients."""
    params = list(theirs.values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, LORA_OPTIM["max_grad_norm"])
    grads = {k: p.grad.detach().clone() for k, p in theirs.items()}
    torch.optim.AdamW(params, lr=LORA_OPTIM["learning_rate"], weight_decay=LORA_OPTIM["weight_decay"]).step()
    return grads


def _compare_step(method_name, case, ours_tensors, record, trl_grads, theirs, start, grad_scale=1.0, note=""):
    ours_g = torch.cat([record.grads[id(ours_tensors[k])].flatten() for k in sorted(theirs)])
    theirs_g = torch.cat([trl_grads[k].flatten() for k in sorted(theirs)])
    largest = theirs_g.abs().max()
    check(method_name, f"LoRA clipped gradients / largest, {case}", ours_g * grad_scale / largest, theirs_g / largest,
          tol=1e-4, note=note)
    moved = max((theirs[k].detach() - start[k]).abs().max().item() for k in theirs)
    # Adam's first step is about lr x sign(gradient): an entry whose gradient is float32 rounding noise (within
    # 100x of Adam's eps) may step either way; those are left out, as in agree_with_trl_offline.py --lora.
    kept = {k: trl_grads[k].abs() > 100 * ADAM_EPS for k in theirs}
    ours_w = torch.cat([ours_tensors[k].detach()[kept[k]] for k in sorted(theirs)])
    theirs_w = torch.cat([theirs[k].detach()[kept[k]] for k in sorted(theirs)])
    check(method_name, f"LoRA weights after one step / largest move, {case}", ours_w / moved, theirs_w / moved,
          tol=1e-2)


def _compare_rollout(method_name, case, scored, forward):
    mask = scored.rollout.response_mask.bool()
    check(method_name, f"behaviour log-probs, {case}", scored.old_logprobs[mask], forward.logps()[mask], tol=1e-5)
    if scored.ref_logprobs is not None:
        ref = forward.ref_logps()
        check(method_name, f"reference log-probs, {case}", scored.ref_logprobs[mask], ref[mask], tol=1e-5)
        return ref
    return None


def _after_step(method_name: str, case: str, method, scored, forward, theirs: dict) -> None:
    """After the step and one more generation by the trained policy (its LoRA merged into the base and the base
    restored): the reference must still be the starting policy, and the policy's forward TRL's forward of the same
    trained LoRA weights (ours, copied in: Adam amplifies float32 rounding where a gradient is near 0, so the two
    runs' weights differ slightly in those entries)."""
    r = scored.rollout
    method.bank.generate(r.prompt_ids, r.prompt_mask, adapter=method.policy_adapter, max_new_tokens=4, do_sample=False)
    mask = r.response_mask.bool()
    with torch.no_grad(), eval_mode(method.bank):
        ref = method.reference_logprobs(r)
        policy = method.policy_forward(r).logprobs
    check(method_name, f"reference log-probs after the step and a generation, {case}", ref[mask],
          forward.ref_logps()[mask], tol=1e-5)
    ours = _lora_tensors(method.bank.model, method.policy_adapter)
    kept = {k: p.detach().clone() for k, p in theirs.items()}
    with torch.no_grad():
        for k, p in theirs.items():
            p.copy_(ours[k])
        check(method_name, f"policy log-probs after the step (our trained weights in TRL's model), {case}",
              policy[mask], forward.logps()[mask], tol=1e-5)
        for k, p in theirs.items():
            p.copy_(kept[k])

def lora_grpo(case: str, sft_dir: str | None) -> None:
    method, rec, start, _, temperature = _fit_ours(GRPO, sft_dir=sft_dir, options=dict(beta=0.04, loss_type="grpo"))
    scored, targets = rec.rollout_and_score, rec.compute_advantages
    model, theirs = _trl_policy(start, sft_dir, temperature)
    forward = _TRLForward(model, scored.rollout, temperature)
    ref = _compare_rollout("GRPO LoRA", case, scored, forward)
    advantages, _ = trl_group_advantages(scored.scores, method.num_samples_per_prompt, "group")
    check("GRPO LoRA", f"advantages, {case}", targets.advantages, advantages)
    old = forward.logps()
    r = scored.rollout
    stub = _stub(GRPOTrainer, None, None, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                 importance_sampling_level="token", beta=method.beta,
                 args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1, report_to=[]),
                 loss_type="grpo", epsilon_low=method.epsilon, epsilon_high=method.epsilon, use_vllm=False,
                 max_completion_length=r.response_ids.shape[1], _entropy_bonus_enabled=False)
    stub._get_per_token_logps_and_entropies = lambda model, *a, **kw: (*forward.logps(grad=True, entropy=True), None)
    inputs = dict(prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, completion_ids=r.response_ids,
                  completion_mask=r.response_mask, advantages=advantages, old_per_token_logps=old,
                  ref_per_token_logps=ref, num_items_in_batch=r.response_mask.sum())
    loss = stub._compute_loss(model, inputs)
    check("GRPO LoRA", f"loss, {case}", rec.losses[0], loss.detach())
    check("GRPO LoRA", f"objective/kl vs kl, {case}", rec.metrics[0]["objective/kl"],
          torch.tensor(stub._metrics["train"]["kl"]).mean(), tol=1e-5)
    grads = _trl_step(theirs, loss)
    _compare_step("GRPO LoRA", case, _lora_tensors(method.bank.model, "policy"), rec, grads, theirs, start)
    _after_step("GRPO LoRA", case, method, scored, forward, theirs)


def lora_grpo_steps(case: str, sft_dir: str | None) -> None:
    """GRPO with ``update_epochs: 2`` and ``num_mini_batches: 2`` (four optimizer steps on one rollout: ratios off 1
    after the first, behaviour log-probs from their own forward) against TRL's ``num_iterations=2``,
    ``steps_per_generation=2``, each step over the rows ours took (recorded), with one AdamW across the steps."""
    method, rec, start, _, temperature = _fit_ours(GRPO, sft_dir=sft_dir, options=dict(
        beta=0.04, loss_type="grpo", update_epochs=2, num_mini_batches=2))
    scored = rec.rollout_and_score
    model, theirs = _trl_policy(start, sft_dir, temperature)
    whole = _TRLForward(model, scored.rollout, temperature)
    ref = _compare_rollout("GRPO LoRA 4 steps", case, scored, whole)
    old = whole.logps()
    advantages, _ = trl_group_advantages(scored.scores, method.num_samples_per_prompt, "group")
    optimizer = torch.optim.AdamW(list(theirs.values()), lr=LORA_OPTIM["learning_rate"],
                                  weight_decay=LORA_OPTIM["weight_decay"])
    losses = []
    for micros in rec.micro_batches:
        (rows,) = micros
        r = Rollout(*(x[rows] for x in scored.rollout))
        forward = _TRLForward(model, r, temperature)
        stub = _stub(GRPOTrainer, None, None, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                     importance_sampling_level="token", beta=method.beta,
                     args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=2, report_to=[]),
                     loss_type="grpo", epsilon_low=method.epsilon, epsilon_high=method.epsilon, use_vllm=False,
                     max_completion_length=r.response_ids.shape[1], _entropy_bonus_enabled=False)
        stub._get_per_token_logps_and_entropies = lambda model, *a, forward=forward, **kw: (
            *forward.logps(grad=True, entropy=True), None)
        inputs = dict(prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, completion_ids=r.response_ids,
                      completion_mask=r.response_mask, advantages=advantages[rows], old_per_token_logps=old[rows],
                      ref_per_token_logps=ref[rows], num_items_in_batch=r.response_mask.sum())
        loss = stub._compute_loss(model, inputs)
        losses.append(loss.detach())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), LORA_OPTIM["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
    check("GRPO LoRA 4 steps", f"loss of each step, {case}", torch.stack(rec.losses), torch.stack(losses), tol=1e-5)
    ours = _lora_tensors(method.bank.model, "policy")
    moved = max((theirs[k].detach() - start[k]).abs().max().item() for k in theirs)
    check("GRPO LoRA 4 steps", f"LoRA weights after four steps / largest move, {case}",
          torch.cat([ours[k].detach().flatten() for k in sorted(theirs)]) / moved,
          torch.cat([theirs[k].detach().flatten() for k in sorted(theirs)]) / moved, tol=1e-2)
    _after_step("GRPO LoRA 4 steps", case, method, scored, whole, theirs)


def lora_rloo(case: str, sft_dir: str | None) -> None:
    method, rec, start, _, temperature = _fit_ours(RLOO, sft_dir=sft_dir, options=dict(kl_coef=0.05))
    scored, targets = rec.rollout_and_score, rec.compute_advantages
    model, theirs = _trl_policy(start, sft_dir, temperature)
    forward = _TRLForward(model, scored.rollout, temperature)
    ref = _compare_rollout("RLOO LoRA", case, scored, forward)
    old = forward.logps()
    r = scored.rollout
    seq_kl = ((old - ref) * r.response_mask).sum(1)
    advantages = trl_rloo_advantages(scored.scores, seq_kl, 0.05, method.num_samples_per_prompt, False)
    check("RLOO LoRA", f"advantages (KL in the reward), {case}", targets.advantages, advantages, tol=1e-5)
    stub = _stub(RLOOTrainer, None, None, epsilon_low=0.2, epsilon_high=0.2)
    stub._get_per_token_logps_and_entropies = lambda model, *a, **kw: (*forward.logps(grad=True, entropy=True), None)
    inputs = dict(prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, completion_ids=r.response_ids,
                  completion_mask=r.response_mask, advantages=advantages, old_logps=old.sum(1))
    loss = stub._compute_loss(model, inputs)
    grads = _trl_step(theirs, loss)
    # On-policy, ours is REINFORCE-LOO's gradient over the step's tokens, TRL's over its responses (README): the
    # same direction, a mean response length apart, which clipping to max_grad_norm (both sides past it) removes.
    _compare_step("RLOO LoRA", case, _lora_tensors(method.bank.model, "policy"), rec, grads, theirs, start)
    _after_step("RLOO LoRA", case, method, scored, forward, theirs)


def lora_online_dpo(case: str, sft_dir: str | None) -> None:
    """TRL's OnlineDPOTrainer: log-probs at temperature 1 (``_forward``); the reference is the base with the adapter
    disabled (a fresh adapter, ``peft_config``), or a frozen copy of the loaded PeftModel (``create_reference_model``)."""
    import copy

    from trl.experimental.online_dpo import OnlineDPOTrainer

    method, rec, start, _, _ = _fit_ours(OnlineDPO, sft_dir=sft_dir, options=dict(temperature=1.0, beta=0.1, num_samples_per_prompt=2))
    scored = rec.rollout_and_score
    model, theirs = _trl_policy(start, sft_dir, 1.0, ref_adapter=False)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if sft_dir else None
    r = scored.rollout
    stub = OnlineDPOTrainer.__new__(OnlineDPOTrainer)
    stub.max_length = 10_000

    def forward(m):
        return stub._forward(m, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask) * r.response_mask

    mask = r.response_mask.bool()
    with torch.no_grad():
        if reference is None:
            with model.disable_adapter():
                ref = forward(model)
        else:
            ref = forward(reference)
    check("OnlineDPO LoRA", f"reference log-probs, {case}", scored.ref_logprobs[mask], ref[mask], tol=1e-5)
    logps = forward(model)
    # TRL's rows: first samples, then second samples; a tie trains with the first as chosen, ours weighs 0 (README):
    # TRL's loss over the untied pairs.
    first, second = torch.arange(0, r.response_ids.shape[0], 2), torch.arange(1, r.response_ids.shape[0], 2)
    untied = scored.scores[first] != scored.scores[second]
    order = torch.cat([first[untied], second[untied]])
    loss = trl_online_dpo_loss(scored.scores[order], logps.sum(1)[order], ref.sum(1)[order], method.beta, "sigmoid")
    check("OnlineDPO LoRA", f"loss over untied pairs ({int(untied.sum())} of {untied.numel()}), {case}", rec.losses[0],
          loss.detach(), tol=1e-6)
    grads = _trl_step(theirs, loss)
    _compare_step("OnlineDPO LoRA", case, _lora_tensors(method.bank.model, "policy"), rec, grads, theirs, start)


def _value_model(value_start: dict, head: torch.nn.Module):
    """TRL 0.x PPO's value model, written out on a LoRA adapter: a separate base carrying the value adapter (the same
    starting weights), ``score`` = our value head (TRL's sequence-classification head has no bias; ours does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.paths import TOY_BASE

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TOY_BASE),
                           LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    tensors = _lora_tensors(model, "default")
    with torch.no_grad():
        for key, p in tensors.items():
            p.copy_(value_start[key])
    score = copy.deepcopy(head)
    return model, score, tensors


def _trl_values(model, score, rollout) -> torch.Tensor:
    """TRL 0.x ``get_reward`` on the value model, sliced ``[context_length - 1 : -1]`` (the positions predicting each
    response token)."""
    mask = rollout.attention_mask
    out = model.get_base_model().model(input_ids=rollout.input_ids, attention_mask=mask,
                                       position_ids=mask.cumsum(1) - mask, use_cache=False)
    values = score(out.last_hidden_state)
    context = rollout.prompt_ids.shape[1]
    return values[:, context - 1 : -1] * rollout.response_mask


def lora_ppo(case: str, sft_dir: str | None, reward_dir: str | None = None, critic: str = "adapter",
             gradient_checkpointing: bool | list[str] = False) -> None:
    """PPO with its value adapter (``critic: adapter``). TRL 1.16 has no PPOTrainer: its last one (0.x) is written
    out above (``trl_ppo_targets``, ``trl_ppo_losses``); here on TRL's forward of the same LoRA policy, and its value
    model as a separate base carrying the same value adapter (TRL trains a whole separate model: by design)."""
    method, rec, start, value_start, temperature = _fit_ours(PPO, sft_dir=sft_dir, reward_dir=reward_dir,
                                                             options=dict(kl_coef=0.05, critic=critic,
                                                                          gradient_checkpointing=gradient_checkpointing))
    scored, targets = rec.rollout_and_score, rec.compute_advantages
    model, theirs = _trl_policy(start, sft_dir, temperature)
    forward = _TRLForward(model, scored.rollout, temperature)
    ref = _compare_rollout("PPO LoRA", case, scored, forward)
    head_start = {"weight": rec.head_start[0], "bias": rec.head_start[1]}
    value_adapter = "value" if critic == "adapter" else "policy"
    head = copy.deepcopy(method.bank.heads[value_adapter])
    with torch.no_grad():
        head.linear.weight.copy_(head_start["weight"])
        head.linear.bias.copy_(head_start["bias"])
    if critic == "adapter":
        value_model, score, value_tensors = _value_model(value_start, head)
    else:  # the value head on the policy's own trunk: TRL has no such critic; written out on TRL's policy
        value_model, score, value_tensors = model, head, {}
    r = scored.rollout
    mask = r.response_mask.bool()
    with torch.no_grad():
        values = _trl_values(value_model, score, r)
    check("PPO LoRA", f"rollout values (value adapter + head), {case}", scored.old_values[mask], values[mask], tol=1e-5)
    old = forward.logps()
    lengths = r.response_mask.sum(1)
    t_adv, t_returns, t_values, pm, pm1 = trl_ppo_targets(scored.scores, old, ref, values, lengths - 1,
                                                          method.kl_controller.value, method.gamma, method.lam, False,
                                                          p1=False)
    check("PPO LoRA", f"advantages (TRL's score moved onto the last token), {case}", targets.advantages[mask],
          t_adv[mask], tol=1e-5)
    check("PPO LoRA", f"returns (TRL's score moved onto the last token), {case}", targets.returns[mask],
          t_returns[mask], tol=1e-5)
    new = forward.logps(grad=True)
    vpred = _trl_values(value_model, score, r)
    pg, _, vf, _ = trl_ppo_losses(new, old, t_adv, vpred, t_values, t_returns, pm, pm1, method.cliprange,
                                  method.cliprange_value)
    loss = pg + method.vf_coef * vf
    check("PPO LoRA", f"loss (policy + vf_coef x value), {case}", rec.losses[0], loss.detach(), tol=1e-6)
    both = {**{f"policy.{k}": v for k, v in theirs.items()}, **{f"value.{k}": v for k, v in value_tensors.items()},
            "value.head.weight": score.linear.weight, "value.head.bias": score.linear.bias}
    params = list(both.values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, LORA_OPTIM["max_grad_norm"])
    grads = {k: p.grad.detach().clone() for k, p in both.items()}
    decay = [p for k, p in both.items() if k != "value.head.bias"]
    torch.optim.AdamW([{"params": decay}, {"params": [score.linear.bias], "weight_decay": 0.0}],
                      lr=LORA_OPTIM["learning_rate"], weight_decay=LORA_OPTIM["weight_decay"]).step()
    ours = {**{f"policy.{k}": v for k, v in _lora_tensors(method.bank.model, "policy").items()},
            **{f"value.{k}": v for k, v in _lora_tensors(method.bank.model, "value").items()},
            "value.head.weight": method.bank.heads[value_adapter].linear.weight,
            "value.head.bias": method.bank.heads[value_adapter].linear.bias}
    begin = {**{f"policy.{k}": v for k, v in start.items()}, **{f"value.{k}": v for k, v in value_start.items()},
             "value.head.weight": head_start["weight"], "value.head.bias": head_start["bias"]}
    _compare_step("PPO LoRA", f"{case} (policy, value {'adapter and ' * (critic == 'adapter')}head)", ours, rec,
                  grads, both, begin)
    _after_step("PPO LoRA", case, method, scored, forward, theirs)
    if reward_dir:
        saved = load_file(f"{reward_dir}/adapter_model.safetensors")
        moved = max((p.detach() - saved[f"base_model.model.{key}"]).abs().max().item()
                    for key, p in _lora_tensors(method.bank.model, "reward").items())
        check("PPO LoRA", "reward adapter after the step: as loaded", moved, 0.0, tol=0.0)
        check("PPO LoRA", "reward adapter scores on the bank vs a sequence-classification model carrying it",
              scored.scores, _trl_reward(reward_dir, r), tol=1e-5)


def _trl_reward(reward_dir: str, rollout) -> torch.Tensor:
    """A reward adapter read as TRL reads a reward model: ``AutoModelForSequenceClassification`` with the adapter
    loaded (peft), its ``score`` our head's weight (+ its bias, which TRL's head lacks), at the last non-pad token of
    prompt + response right-padded. On the rollout's own ids: TRL re-tokenizes the decoded text, which drops the
    EOS a reward adapter on the bank reads (README, reward sources)."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from lit_rlhf.models.saving import HEAD_FILE
    from tests.paths import TOY_BASE

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report: the LM head unused, the score head new
    base = AutoModelForSequenceClassification.from_pretrained(TOY_BASE, num_labels=1)
    transformers.utils.logging.set_verbosity(verbosity)
    head = load_file(f"{reward_dir}/{HEAD_FILE}")
    with torch.no_grad():
        base.score.weight.copy_(head["linear.weight"])
    config = PeftConfig.from_pretrained(reward_dir)
    config.task_type = None  # saved as a causal LM's adapter: the same LoRA tensors on the classifier's trunk
    model = PeftModel.from_pretrained(base, reward_dir, config=config).eval()
    rows = []
    for p, pm, c, cm in zip(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask):
        rows.append(torch.cat([p[pm.bool()], c[cm.bool()]]))
    width = max(len(x) for x in rows)
    pad = model.config.pad_token_id
    ids = torch.stack([torch.cat([x, x.new_full((width - len(x),), pad)]) for x in rows])
    attention = torch.stack([torch.arange(width) < len(x) for x in rows]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, 0]
    return logits + head["linear.bias"]


def lora_checks() -> None:
    with tempfile.TemporaryDirectory() as root:
        sft_dir = _saved_sft_adapter(root)
        for case, path in (("fresh adapter", None), ("from a loaded SFT adapter", sft_dir)):
            lora_grpo(case, path)
            lora_grpo_steps(case, path)
            lora_rloo(case, path)
            lora_online_dpo(case, path)
            lora_ppo(case, path)
            lora_ppo(f"{case}, critic: shared", path, critic="shared")
        lora_ppo("fresh adapter, reward adapter on the bank", None, reward_dir=_saved_reward_adapter(root))
        lora_ppo("from a loaded SFT adapter, gradient_checkpointing: true", sft_dir, gradient_checkpointing=True)
        lora_ppo("fresh adapter, gradient_checkpointing: [policy]", None, gradient_checkpointing=["policy"])
        with_head = _saved_sft_adapter(root, modules_to_save=["lm_head"])
        lora_grpo("from a loaded SFT adapter + lm_head (modules_to_save)", with_head)
        lora_ppo("from a loaded SFT adapter + lm_head (modules_to_save)", with_head)


# -- mixtures of experts (--moe) --------------------------------------------------------------------


def moe_checks() -> None:
    """GRPO's and RLOO's router load-balancing loss of the update forward against TRL 1.16's: its
    ``_get_per_token_logps_and_entropies(..., compute_aux_loss=True)`` (the model's own ``aux_loss`` of the rows,
    fused LM head) on a tiny Mixtral, our forward over whole rows and with shared prompts, fused head and logits.
    TRL's model in eval mode: ours turns router jitter off (README), TRL's trains with it."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    root = tempfile.mkdtemp()
    path = str(build_tiny("mixtral", f"{root}/mixtral"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    prompts_ = torch.randint(4, model.config.vocab_size, (2, 6), generator=g).repeat_interleave(3, dim=0)
    response_mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4, 1, 5, 3])[:, None]).long()
    responses = torch.randint(4, model.config.vocab_size, (6, 5), generator=g) * response_mask
    r = Rollout(prompts_, torch.ones_like(prompts_), responses, response_mask, torch.zeros(6, dtype=torch.bool))
    stub = GRPOTrainer.__new__(GRPOTrainer)
    stub.__dict__.update(accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True),
                         temperature=1.0, args=SimpleNamespace(report_to=[]))
    _, _, theirs = GRPOTrainer._get_per_token_logps_and_entropies(stub, model, r.input_ids, r.attention_mask, 5,
                                                                  compute_aux_loss=True)
    for cls in (GRPO, RLOO):
        method = cls(bank=BankSpec(model=path, lora=LoraSpec(r=LORA_R, alpha=LORA_ALPHA)), num_samples_per_prompt=3,
                     rewards=[{"kind": "function", "function": "lit_rlhf.toy:reward"}])
        method.configure_model()  # a fresh adapter: the policy is the base TRL's model is
        for shared in (True, False):
            for fused in (True, False):
                method._prompt_sharing, method.fuses_policy_head = shared, (lambda fused=fused: fused)
                ours = method.policy_pass(r).router_aux.detach()
                check(cls.__name__, f"MoE aux_loss, {'shared prompts' if shared else 'whole rows'}, "
                      f"{'fused head' if fused else 'logits'}", ours, theirs, tol=1e-6)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    show_all = "--all" in sys.argv
    torch.manual_seed(0)
    if "--lora" in sys.argv:
        lora_checks()
        return report(show_all)
    if "--moe" in sys.argv:
        moe_checks()
        return report(show_all)
    grpo_checks()
    grpo_dapo_steps_checks()
    grpo_entropy_bonus_checks()
    grpo_method_checks()
    rloo_checks()
    rloo_kl_in_loss_checks()
    ppo_checks()
    online_dpo_checks()
    gkd_checks()
    gkd_method_checks()
    report(show_all)


def report(show_all: bool) -> None:
    width = max(len(f"{m} {w}") for m, w, _, _ in ROWS)
    for method, what, diff, verdict in ROWS:
        if show_all or verdict != "agree":
            print(f"{method + ' ' + what:<{width}}  {diff:.2e}  {verdict}")
    differs = [row for row in ROWS if row[3].startswith("DIFFERS")]
    unexplained = [row for row in differs if "by design" not in row[3]]
    print(f"\n{len(ROWS)} checks: {len(ROWS) - len(differs)} agree, {len(differs) - len(unexplained)} differ by design, "
          f"{len(unexplained)} differ otherwise (--all lists every check)")


if __name__ == "__main__":
    main()
