"""The setups users run first, where a method could train the wrong model silently: an SFT adapter
as the starting policy (and so the reference), LoRA dropout, gradient checkpointing, a critic
adapter under checkpointing, and model families other than the toy Llama."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers.modeling_layers import GradientCheckpointingLayer

from lit_rlhf.cli import build_cli
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.methods import DPO, GRPO, PPO
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.toy.families import FAMILIES, build_tiny

from tests.methods.online_helpers import first_batch, make_online, prompts, saved_random_adapter, trainer
from tests.paths import TOY_BASE

TRAIN = "assets/toy/data/preference_train.jsonl"
VAL = "assets/toy/data/preference_val.jsonl"


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> str:
    """A saved policy adapter away from the base: the SFT stage's output stand-in."""
    return saved_random_adapter(tmp_path_factory.mktemp("sft") / "adapter", "policy")


def recompute_counter(method) -> list[int]:
    """Calls of the first decoder layer's sub-layers: a checkpointed layer runs them again in backward."""
    method.configure_model()
    layer = next(m for m in method.bank.model.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = [0]
    for sub in layer.children():
        sub.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(**{**options, **kwargs})


def dpo_step_calls(tmp_path, train_mode: str, checkpointing: bool) -> int:
    pl.seed_everything(0)
    method = DPO(learning_rate=1e-3, bank=BankSpec(model=TOY_BASE, train_mode=train_mode, lora=LoraSpec(r=4),
                                                   gradient_checkpointing=checkpointing))
    calls = recompute_counter(method)
    quiet_trainer(tmp_path, max_steps=1).fit(method, PreferenceDataModule(train=TRAIN, batch_size=4, max_length=64))
    return calls[0]


@pytest.mark.parametrize("train_mode", ["lora", "qlora", "full"])
def test_gradient_checkpointing_recomputes_in_a_dpo_step(tmp_path, train_mode):
    plain = dpo_step_calls(tmp_path, train_mode, checkpointing=False)
    checkpointed = dpo_step_calls(tmp_path, train_mode, checkpointing=True)
    # Policy forward + reference forward without; the recomputation of the policy's layer on top with.
    assert checkpointed > plain > 0, (plain, checkpointed)


@pytest.mark.parametrize("cls", [PPO, GRPO])
def test_gradient_checkpointing_recomputes_in_an_online_step(cls):
    counts = []
    for checkpointing in (False, True):
        pl.seed_everything(0)
        method = make_online(cls, num_samples_per_prompt=2, update_epochs=1, num_mini_batches=1, max_new_tokens=4)
        method.bank_spec.gradient_checkpointing = checkpointing
        method._prompt_sharing = False  # the same forwards in both runs: only the recomputation differs
        calls = recompute_counter(method)
        trainer(rollouts=1).fit(method, datamodule=prompts(batch_size=2))
        counts.append(calls[0])
    assert counts[1] > counts[0] > 0, counts


def test_dpo_reference_is_the_loaded_policy_so_validation_rewards_start_at_zero(tmp_path, sft_adapter):
    adapters = json.dumps([{"name": "policy", "path": sft_adapter}])
    common = ["--config", "configs/dpo.yaml", "--model.init_args.bank.adapters", adapters,
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    metrics = build_cli(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "start")]).trainer.callback_metrics
    assert metrics["val/rewards/chosen"].item() == 0.0 and metrics["val/rewards/margins"].item() == 0.0

    # The bare base as reference, when asked for: the SFT adapter's rewards are then not zero.
    metrics = build_cli(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "base"),
                         "--model.init_args.bank.reference", "base"]).trainer.callback_metrics
    assert abs(metrics["val/rewards/chosen"].item()) > 1e-3


def precomputing_dpo_step(tmp_path, **bank) -> tuple[DPO, dict[str, float]]:
    """One DPO step with reference log-probs precomputed: the method and the step's metrics."""
    method = DPO(learning_rate=1e-3, precompute_ref_logps=True, bank=BankSpec(lora=LoraSpec(r=4), **bank))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(method, PreferenceDataModule(train=TRAIN, batch_size=4, max_length=64))
    return method, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_precomputed_reference_is_the_loaded_policy(tmp_path, sft_adapter):
    pl.seed_everything(0)
    _, metrics = precomputing_dpo_step(tmp_path, model=TOY_BASE, adapters=[AdapterSpec("policy", path=sft_adapter)])
    # Before the first update the policy is its reference (old code: the bare base, rewards 0.022 and -0.012).
    for name in ("rewards/chosen", "rewards/rejected"):
        assert abs(metrics[name]) < 1e-5, metrics


def test_precomputed_reference_never_drops(tmp_path):
    # Full mode keeps no frozen copy when the reference is precomputed: the policy itself, which trains with
    # the base's dropout here (GPT-2: 0.1), gives the reference log-probs, in eval mode.
    model = str(build_tiny("gpt2", tmp_path / "gpt2"))
    caches = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        method, _ = precomputing_dpo_step(tmp_path, model=model, train_mode="full", disable_dropout=False)
        caches.append(method._ref_cache["train"])
    torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)


def test_ppo_from_a_loaded_policy_starts_with_zero_kl(sft_adapter):
    pl.seed_everything(0)
    method = make_online(PPO, adapters=[AdapterSpec("policy", path=sft_adapter)], num_samples_per_prompt=2)
    method.configure_model()
    scored = method.rollout_and_score(first_batch(method))
    assert method.bank.adapters["reference"].trainable is False
    assert "reference" not in {n.split(".")[-2] for n in method.bank.trainable_names() if "lora_" in n}
    torch.testing.assert_close(scored.ref_logprobs, scored.old_logprobs, atol=0, rtol=0)
    assert scored.old_logprobs.abs().sum() > 0


class StepMetrics(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, *args):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_grpo_first_update_has_ratio_one_with_lora_dropout_configured():
    pl.seed_everything(0)
    method = make_online(GRPO, update_epochs=1, num_mini_batches=1, num_samples_per_prompt=2)
    method.bank_spec.lora.dropout = 0.3
    record = StepMetrics()
    trainer(rollouts=3, callbacks=[record]).fit(method, datamodule=prompts(batch_size=2))
    assert len(record.steps) == 3
    for step in record.steps:
        assert abs(step["policy/approxkl"]) < 1e-6 and step["policy/clipfrac"] == 0.0, step


def ppo_weights_after_four_steps(checkpointing: bool | list[str]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    method = make_online(PPO, num_samples_per_prompt=2, update_epochs=2, num_mini_batches=2, critic="adapter")
    method.bank_spec.gradient_checkpointing = checkpointing
    # Whole rows in both runs (a checkpointed forward with gradients cannot share prompts): the same ops,
    # so Adam's normalised steps cannot blow a rounding difference up into a different weight.
    method._prompt_sharing = False
    trainer(rollouts=1).fit(method, datamodule=prompts(batch_size=2))
    assert method.trainer.global_step == 4
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [True, ["policy"]])
def test_ppo_critic_adapter_trains_identically_with_and_without_checkpointing(checkpointing):
    plain = ppo_weights_after_four_steps(checkpointing=False)
    checkpointed = ppo_weights_after_four_steps(checkpointing=checkpointing)
    assert any(".value." in n for n in plain) and plain.keys() == checkpointed.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["dpo", "reward", "ppo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_config_fits_on_every_family(tmp_path, family, config):
    model = build_tiny(family, tmp_path / family)
    cli = build_cli(["fit", "--config", f"configs/{config}.yaml", "--model.init_args.bank.model", str(model),
                     "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
                     "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step >= 2
    assert all(torch.isfinite(v).all() for v in cli.trainer.callback_metrics.values())
