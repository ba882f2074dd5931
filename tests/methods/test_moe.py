"""Mixtures of experts through the methods: the router's load-balancing loss added as TRL adds it, the
policy computing the reference's function before the first step (router jitter off), and a fit that learns."""

from __future__ import annotations

import json
import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods import DPO, GRPO, KTO, SFT, RewardModeling
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.toy.families import build_tiny

from tests.methods.online_helpers import make_online, prompts, trainer
from tests.paths import TOY_BASE, TOY_DATA

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    """A tiny Mixtral whose config turns router jitter on (0.1) and leaves ``output_router_logits`` false."""
    return str(build_tiny("mixtral", tmp_path_factory.mktemp("mixtral") / "mixtral"))


class Steps(Callback):
    """Each training step's returned loss, logged metrics, and transformers' own ``aux_loss`` of the policy on
    the step's padded batch, taken before the step (the policy is the base then: a fresh LoRA)."""

    def __init__(self):
        self.losses, self.metrics, self.model_aux = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():
            out = module.bank.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_router_logits=True, use_cache=False)
        self.model_aux.append(float(out.aux_loss))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(method, data, steps: int, tmp_path) -> Steps:
    record = Steps()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
               default_root_dir=tmp_path, callbacks=[record]).fit(method, data)
    return record


def preference() -> PreferenceDataModule:
    return PreferenceDataModule(str(TOY_DATA / "preference_train.jsonl"), batch_size=4, max_length=48)


def bank(model: str, **lora) -> BankSpec:
    return BankSpec(model=model, lora=LoraSpec(r=4, alpha=8, **lora))


def test_dpo_first_loss_is_ln2_with_router_jitter_in_the_config(mixtral, tmp_path):
    # Before the fix the train-mode jitter made the policy's log-probs differ from the reference's: loss != ln 2.
    pl.seed_everything(0)
    record = fit(DPO(bank=bank(mixtral), router_aux_loss_coef=0.0), preference(), 1, tmp_path)
    assert record.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert record.metrics[0]["rewards/margins"] == 0.0 and "aux_loss" not in record.metrics[0]


@pytest.mark.parametrize("coef", [None, 0.5])
def test_dpo_adds_the_weighted_router_aux_loss_of_the_policy_forward(mixtral, tmp_path, coef):
    # None: the config's router_aux_loss_coef (0.001), although the config's output_router_logits is false (TRL 1.16).
    pl.seed_everything(0)
    method = DPO(bank=bank(mixtral), router_aux_loss_coef=coef)
    record = fit(method, preference(), 1, tmp_path)
    weight = 0.001 if coef is None else coef
    aux = record.metrics[0]["aux_loss"]
    # The padding-free forward's loss over the real tokens is transformers' own on the padded batch.
    assert method.uses_packing()
    assert aux == pytest.approx(record.model_aux[0], rel=1e-5)
    assert record.losses[0] == pytest.approx(math.log(2) + weight * aux, rel=1e-6)


def test_sft_adds_the_weighted_router_aux_loss(mixtral, tmp_path):
    pl.seed_everything(0)
    record = fit(SFT(bank=bank(mixtral), router_aux_loss_coef=0.25),
                 SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=48), 1, tmp_path)
    step = record.metrics[0]
    assert step["aux_loss"] == pytest.approx(record.model_aux[0], rel=1e-5)
    assert record.losses[0] == pytest.approx(math.log(step["ppl"]) + 0.25 * step["aux_loss"], rel=1e-6)
    assert step["loss"] == pytest.approx(record.losses[0], rel=1e-6)  # the objective, as TRL logs it


def validate(method, data) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(method, data, verbose=False)[0].items()}


def model_aux_of(method, batch) -> float:
    with torch.no_grad(), method.bank.role(method.trained_adapter):
        out = method.bank.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_router_logits=True, use_cache=False)
    return float(out.aux_loss)


def test_validation_loss_adds_the_weighted_router_aux_loss_as_trl_does(mixtral, tmp_path):
    # TRL's evaluation runs its training compute_loss: eval_loss counts router_aux_loss_coef · aux too. Before,
    # ours left it out (no val/aux_loss, val/loss the bare DPO / NLL loss).
    rows = (TOY_DATA / "preference_val.jsonl").read_text().splitlines()[:4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    data = PreferenceDataModule(str(TOY_DATA / "preference_train.jsonl"), str(tmp_path / "pairs.jsonl"),
                                batch_size=4, max_length=48)
    dpo = DPO(bank=bank(mixtral), router_aux_loss_coef=0.5)
    metrics = validate(dpo, data)
    # One batch; the fresh policy is its reference (loss ln 2) and the base whose aux transformers computes.
    assert metrics["val/aux_loss"] == pytest.approx(model_aux_of(dpo, data.collator(data.val_examples)), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(math.log(2) + 0.5 * metrics["val/aux_loss"], rel=1e-6)

    sft_rows = (TOY_DATA / "sft_train.jsonl").read_text().splitlines()[:4]
    (tmp_path / "sft.jsonl").write_text("\n".join(sft_rows) + "\n")
    data = SFTDataModule(str(tmp_path / "sft.jsonl"), str(tmp_path / "sft.jsonl"), batch_size=4, max_length=48)
    sft = SFT(bank=bank(mixtral), router_aux_loss_coef=0.25)
    metrics = validate(sft, data)
    assert metrics["val/aux_loss"] == pytest.approx(model_aux_of(sft, data.collator(data.val_examples)), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(math.log(metrics["val/ppl"]) + 0.25 * metrics["val/aux_loss"],
                                                rel=1e-6)


@pytest.mark.filterwarnings("ignore:KTO class balance")  # the toy data's; the loss checked is per row
def test_kto_adds_the_router_aux_loss_of_its_policy_forward_only(mixtral, tmp_path):
    # The KL pairs' forward runs without gradient: one load-balancing loss, of the rows' own forward. At the
    # start the policy is the reference and the KL estimate 0, so each row's KTO loss is 1 - σ(0) = 0.5.
    pl.seed_everything(0)
    record = fit(KTO(bank=bank(mixtral), router_aux_loss_coef=0.5),
                 UnpairedDataModule(str(TOY_DATA / "unpaired_train.jsonl"), batch_size=4, max_length=48), 1, tmp_path)
    aux = record.metrics[0]["aux_loss"]
    assert aux == pytest.approx(record.model_aux[0], rel=1e-5)
    assert record.losses[0] == pytest.approx(0.5 + 0.5 * aux, rel=1e-6)


def test_a_router_aux_loss_coef_on_a_dense_model_or_a_reward_model_is_refused():
    method = SFT(bank=BankSpec(model=TOY_BASE), router_aux_loss_coef=0.01)
    with pytest.raises(InvalidArgument, match="router_aux_loss_coef is 0.01, but LlamaConfig is no mixture of experts"):
        method.configure_model()
    with pytest.raises(InvalidArgument, match="RewardModeling adds no router load-balancing loss"):
        RewardModeling(bank=BankSpec(model=TOY_BASE), router_aux_loss_coef=0.01)


def test_grpo_first_rollout_has_zero_kl_and_ratio_one_with_router_jitter_in_the_config(mixtral, caplog):
    # The update's forward runs in train mode and the reference's in eval mode: with the jitter live (before the
    # fix) the first rollout's KL to the reference was about 3e-7, not 0 up to float rounding.
    pl.seed_everything(0)
    method = make_online(GRPO, update_epochs=1, num_mini_batches=1, num_samples_per_prompt=2, beta=0.1)
    method.bank_spec.model = mixtral
    metrics = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, *args):
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    with caplog.at_level(logging.WARNING, logger="lit_rlhf.methods"):
        trainer(rollouts=1, callbacks=[Record()]).fit(method, datamodule=prompts(batch_size=2))
    # GRPO adds the load-balancing loss of its update forward (tests/methods/test_moe_online.py), so no warning.
    assert not any("does not add this mixture of experts' router" in r.getMessage() for r in caplog.records)
    first = metrics[0]
    assert first["aux_loss"] > 0
    assert abs(first["objective/kl"]) < 1e-11 and abs(first["policy/approxkl"]) < 1e-11, first
    assert first["policy/clipfrac"] == 0.0


def test_a_config_asking_for_router_logits_samples_and_exports_as_loaded(tmp_path):
    # TRL's SFT saves its MoE models with output_router_logits: true. Every forward then returned router logits,
    # and the first KV-cached decode step of a rollout failed in the model's own load-balancing loss (a size
    # mismatch between its attention mask and the step's router logits).
    model = build_tiny("olmoe", tmp_path / "olmoe")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"output_router_logits": True}))
    pl.seed_everything(0)
    method = make_online(GRPO, update_epochs=1, num_mini_batches=1, num_samples_per_prompt=2)
    method.bank_spec.model = str(model)
    trainer(rollouts=1).fit(method, datamodule=prompts(batch_size=2))
    assert method.rollout_count == 1

    full = SFT(bank=BankSpec(model=str(model), train_mode="full"))
    full.configure_model()
    assert full.bank.model.config.output_router_logits is False and full._router_aux_weight == 0.01
    full.export(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["output_router_logits"] is True


def dpo_loss_on(method, path) -> float:
    data = PreferenceDataModule(str(path), batch_size=16, max_length=48).prepare(method.tokenizer)
    with torch.no_grad():
        return float(method.compute_loss(data.collator(data.train_examples))[0])


@pytest.mark.slow
def test_dpo_on_mixtral_experts_learns(mixtral, tmp_path):
    rows = (TOY_DATA / "preference_train.jsonl").read_text().splitlines()[:16]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    pl.seed_everything(0)
    method = DPO(bank=bank(mixtral), learning_rate=1e-2, beta=0.5)  # all-linear: LoRA on attention and experts
    method.configure_model()
    before = dpo_loss_on(method, tmp_path / "rows.jsonl")
    fit(method, PreferenceDataModule(str(tmp_path / "rows.jsonl"), batch_size=4, max_length=48), 20, tmp_path)
    after = dpo_loss_on(method, tmp_path / "rows.jsonl")
    assert before == pytest.approx(math.log(2), abs=1e-6)
    assert after < 0.5 * before, (before, after)
