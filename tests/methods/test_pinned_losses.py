"""Pinned per-step losses of the online methods and GKD: a refactor must not move a number.

As torchtune's recipe tests pin ``_get_expected_loss_values``: a tiny model, fixed seeds, a few
rollouts, and the logged loss (with one or two key metrics) of each training step written out as
literals. The values were read from the code as it stood before the online-loop refactor (issue 16);
a change that alters what a step computes fails here with the step and metric named. The engine is
named explicitly (``hf``) so that a change of the default engine does not move the numbers.

Tolerance: rel 1e-5, and abs 1e-6 for the metrics that are differences of two log-prob sums (a KL, a
reward margin): those sums are ~1e2, where float32 resolves ~1e-5, so the same math run in another
order (each distinct prompt once, ``models.prefix``) moves the difference by ~1e-7. Any change of what a
step computes moves these metrics by orders of magnitude more.

To re-read the numbers after an intended change of behaviour: ``PIN_PRINT=1 pytest -s`` on this file.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest

from lit_rlhf.data import PromptDataModule, SFTDataModule
from lit_rlhf.methods import GRPO, GKD, PPO, RLOO, BestOfN, OnlineDPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig
from tests.paths import TOY_BASE, TOY_DATA, TOY_TEACHER

REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]


class StepMetrics(pl.Callback):
    """The named metrics as logged by each training step (``callback_metrics`` after the step)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({name: float(trainer.callback_metrics[name]) for name in self.names})


def bank(**kwargs) -> BankSpec:
    return BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16), **kwargs)


def online(cls, **kwargs):
    kwargs.setdefault("num_samples_per_prompt", 2)
    return cls(bank=bank(), rewards=REWARD, engine="hf", learning_rate=3e-3, num_mini_batches=2,
               log_samples_every_n_rollouts=0, sampling=SamplingConfig(max_new_tokens=6), **kwargs)


def prompts() -> PromptDataModule:
    return PromptDataModule(train=str(TOY_DATA / "prompt_train.jsonl"), batch_size=4, max_length=32)


def sft() -> SFTDataModule:
    return SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=48)


def run(method, data, names: tuple[str, ...], steps: int) -> list[dict[str, float]]:
    pl.seed_everything(0, verbose=False)
    metrics = StepMetrics(names)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=1, limit_train_batches=steps,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[metrics])
    trainer.fit(method, datamodule=data)
    return metrics.steps


def check(name: str, got: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    if os.environ.get("PIN_PRINT"):
        print(f"\n{name} = {got!r}")
    assert len(got) == len(expected), f"{name}: {len(got)} steps logged, {len(expected)} pinned"
    for step, (row, pinned) in enumerate(zip(got, expected)):
        for metric, value in pinned.items():
            assert row[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} step {step} {metric}"


# Each method: two training steps (rollouts) of 4 prompts, two mini-batches (optimizer steps) each.


def test_ppo_pinned_losses():
    # Separate value adapter; the second mini-batch split into two micro-batches exercises accumulation.
    method = online(PPO, gradient_accumulation_steps=2)
    got = run(method, prompts(), ("loss/policy", "loss/value", "objective/kl", "value/clipfrac"), steps=2)
    check("ppo", got, PPO_PINNED)


def test_rloo_pinned_losses():
    method = online(RLOO, num_samples_per_prompt=4, kl_coef=0.05)
    got = run(method, prompts(), ("loss/policy", "objective/kl", "objective/rlhf_reward"), steps=2)
    check("rloo", got, RLOO_PINNED)


def test_grpo_pinned_losses():
    method = online(GRPO, num_samples_per_prompt=4, beta=0.04, loss_type="dapo")
    got = run(method, prompts(), ("loss/policy", "objective/kl", "frac_reward_zero_std"), steps=2)
    check("grpo", got, GRPO_PINNED)


def test_best_of_n_pinned_losses():
    method = online(BestOfN, num_samples_per_prompt=4, min_score=0.0)
    got = run(method, prompts(), ("loss/sft", "best_of_n/kept", "objective/best_score"), steps=2)
    check("best_of_n", got, BEST_OF_N_PINNED)


def test_online_dpo_pinned_losses():
    method = online(OnlineDPO)
    got = run(method, prompts(), ("loss/dpo", "rewards/margins", "frac_ties"), steps=2)
    check("online_dpo", got, ONLINE_DPO_PINNED)


def test_gkd_pinned_losses():
    # lmbda 0.5 with seq_kd: each step's completions come from the student or from the teacher.
    method = GKD(bank=bank(teacher=TeacherSpec(model=TOY_TEACHER)), engine="hf", lmbda=0.5, seq_kd=True,
                 beta=0.5, learning_rate=3e-3, sampling=SamplingConfig(max_new_tokens=6))
    got = run(method, sft(), ("loss", "on_policy", "completion_length"), steps=4)
    check("gkd", got, GKD_PINNED)


PPO_PINNED = [
    {"loss/policy": -0.0005452455952763557, "loss/value": 0.27299484610557556, "objective/kl": 0.0, "value/clipfrac": 0.2613636255264282},
    {"loss/policy": -0.001750171184539795, "loss/value": 0.11924344301223755, "objective/kl": 0.05936381220817566, "value/clipfrac": 0.09545454382896423},
]
RLOO_PINNED = [
    {"loss/policy": 0.013998724520206451, "objective/kl": 0.0, "objective/rlhf_reward": 0.0520833358168602},
    {"loss/policy": -0.0018607079982757568, "objective/kl": 0.011051207780838013, "objective/rlhf_reward": -0.06409423053264618},
]
GRPO_PINNED = [
    {"loss/policy": 0.024571463465690613, "objective/kl": 0.00031233468325808644, "frac_reward_zero_std": 0.0},
    {"loss/policy": -0.015614315867424011, "objective/kl": 0.005474024452269077, "frac_reward_zero_std": 0.0},
]
BEST_OF_N_PINNED = [
    {"loss/sft": 2.864290714263916, "best_of_n/kept": 1.0, "objective/best_score": 0.574999988079071},
    {"loss/sft": 2.9748997688293457, "best_of_n/kept": 0.75, "objective/best_score": 0.4791666567325592},
]
ONLINE_DPO_PINNED = [
    {"loss/dpo": 0.6932518482208252, "rewards/margins": -0.0002016066573560238, "frac_ties": 0.0},
    {"loss/dpo": 0.6926220655441284, "rewards/margins": 0.0011278856545686722, "frac_ties": 0.25},
]
GKD_PINNED = [
    {"loss": 0.032863032072782516, "on_policy": 0.0, "completion_length": 5.75},
    {"loss": 0.022973697632551193, "on_policy": 0.0, "completion_length": 5.25},
    {"loss": 0.03017977625131607, "on_policy": 0.3333333432674408, "completion_length": 5.5},
    {"loss": 0.02513837069272995, "on_policy": 0.5, "completion_length": 6.0},
]
