"""DPO family as LightningModules: learning on the toy task, modes, resume, export, CLI."""

from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import toy
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.methods import DPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.toy.evaluate import mean_score

TRAIN = "assets/toy/data/preference_train.jsonl"
VAL = "assets/toy/data/preference_val.jsonl"


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def small_dpo(**kwargs) -> DPO:
    kwargs.setdefault("bank", BankSpec(lora=LoraSpec(r=8, alpha=16)))
    kwargs.setdefault("beta", 1.0)
    return DPO(learning_rate=3e-3, **kwargs)


def test_dpo_raises_ground_truth_score_on_held_out_prompts(tmp_path):
    pl.seed_everything(0)
    method = small_dpo()
    data = PreferenceDataModule(train=TRAIN, batch_size=16, max_length=64)
    trainer(tmp_path, max_epochs=2).fit(method, data)
    _, held_out = toy.split_prompts()
    before = mean_score(method.bank, method.tokenizer, held_out, adapter=None)
    after = mean_score(method.bank, method.tokenizer, held_out, adapter="policy")
    sampled_before = mean_score(method.bank, method.tokenizer, held_out * 4, adapter=None, do_sample=True)
    sampled_after = mean_score(method.bank, method.tokenizer, held_out * 4, adapter="policy", do_sample=True)
    # Measured (seeds 0 and 1): greedy 0.0 -> 1.0, sampled -0.05 -> 0.5-0.75.
    assert after > before + 0.3, (before, after)
    assert sampled_after > sampled_before + 0.3, (sampled_before, sampled_after)


@pytest.mark.parametrize("train_mode", ["qlora", "full"])
def test_dpo_runs_in_qlora_and_full_mode(tmp_path, train_mode):
    pl.seed_everything(0)
    method = small_dpo(bank=BankSpec(train_mode=train_mode, lora=LoraSpec(r=4)))
    data = PreferenceDataModule(train=TRAIN, val=VAL, batch_size=8, max_length=64)
    before = {n: p.detach().clone() for n, p in _configured(method).bank.named_parameters() if p.requires_grad}
    trainer(tmp_path, max_steps=6, limit_val_batches=2).fit(method, data)
    assert trainer is not None and method.trainer.global_step == 6
    changed = [n for n, p in method.bank.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "no trainable weight moved"
    if train_mode == "full":
        assert method.bank.reference_model is not None
        assert all(not p.requires_grad for p in method.bank.reference_model.parameters())


def _configured(method):
    method.configure_model()
    return method


def _trainable_state(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if n in set(method.bank.trainable_names())}


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    def run(max_steps, ckpt_path=None, callbacks=()):
        pl.seed_everything(0)
        # Dropout makes the RNG state part of what a resume must restore.
        method = small_dpo(bank=BankSpec(lora=LoraSpec(r=4, dropout=0.1)))
        data = PreferenceDataModule(train=VAL, batch_size=8, max_length=64, seed=3)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        t.fit(method, data, ckpt_path=ckpt_path)
        return method

    straight = _trainable_state(run(10))
    # The "interrupted" run checkpoints at step 5 (mid-epoch: 12 batches an epoch) and dies at step 7.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    run(7, callbacks=[checkpoint])
    saved = torch.load(tmp_path / "ckpt" / "step=5.ckpt", weights_only=True)
    assert all(".lora_" in k for k in saved["state_dict"]), "a LoRA checkpoint must hold only trainable state"
    resumed = _trainable_state(run(10, ckpt_path=tmp_path / "ckpt" / "step=5.ckpt"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_reference_free_and_precomputed_reference(tmp_path):
    pl.seed_everything(0)
    data = PreferenceDataModule(train=VAL, batch_size=8, max_length=64)
    data.prepare(small_dpo().tokenizer)
    batch = data.collator(data.train_examples[:8])
    live = _configured(small_dpo())
    free = _configured(small_dpo(reference_free=True))
    # Fresh LoRA is a no-op: live-reference DPO starts at log(2) exactly, reference-free does not.
    live_loss, _ = live.compute_loss(batch)
    free_loss, _ = free.compute_loss(batch)
    torch.testing.assert_close(live_loss, torch.tensor(0.6931471805599453), atol=1e-6, rtol=0)
    assert abs(free_loss.item() - 0.6931) > 1e-3


def test_precomputed_reference_matches_the_live_reference(tmp_path):
    pl.seed_everything(0)
    data = PreferenceDataModule(train=VAL, batch_size=8, max_length=64)
    live = small_dpo()
    trainer(tmp_path, max_steps=3).fit(live, data)
    batch = data.collator(data.train_examples[:8])
    assert "ref_chosen_logps" not in batch

    pl.seed_everything(0)
    data = PreferenceDataModule(train=VAL, batch_size=8, max_length=64)
    cached = small_dpo(precompute_ref_logps=True)
    trainer(tmp_path, max_steps=3).fit(cached, data)
    batch = data.collator(data.train_examples[:8])
    with live.bank.reference():
        expected = live.pair_logps(batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], expected.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["ref_rejected_logps"], expected.rejected, atol=1e-5, rtol=0)
    # Same data order and same reference: the two runs end with the same weights.
    for name, value in _trainable_state(live).items():
        torch.testing.assert_close(_trainable_state(cached)[name], value, atol=1e-5, rtol=0)


def test_full_mode_with_precomputed_reference_keeps_no_copy(tmp_path):
    pl.seed_everything(0)
    method = small_dpo(bank=BankSpec(train_mode="full"), precompute_ref_logps=True)
    trainer(tmp_path, max_steps=2).fit(method, PreferenceDataModule(train=VAL, batch_size=8, max_length=64))
    assert method.bank.reference_model is None
    assert method._ref_cache["train"].shape == (96, 2)


def test_bco_pair_delta_is_the_running_mean_of_training_batch_rewards(tmp_path):
    """BCO's δ (Jung et al. 2024): the mean of every training batch's mean reward so far, this one
    included; validation reads it without moving it; a checkpoint restores it."""
    method = small_dpo(loss_type="bco_pair")
    fit = trainer(tmp_path)
    method.trainer = fit
    fit.training = True
    assert method.bco_delta(torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0])) == pytest.approx(0.5)
    assert method.bco_delta(torch.tensor([3.0, 3.0]), torch.tensor([3.0, 3.0])) == pytest.approx((0.5 + 3.0) / 2)
    fit.validating = True
    assert method.bco_delta(torch.tensor([100.0]), torch.tensor([100.0])) == pytest.approx(1.75)
    resumed = small_dpo(loss_type="bco_pair")
    resumed.on_load_checkpoint({"state_dict": {}, "bco_running_mean": (3.5, 2)})
    assert resumed.bco_delta(torch.tensor([0.0]), torch.tensor([0.0])) == pytest.approx(1.75)
