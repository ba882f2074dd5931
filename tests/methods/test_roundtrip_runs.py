"""What a run writes reloads to what it trained, on families other than the toy Llama: a stopped run
resumes exactly (GPT-2 LoRA; Qwen2 and Gemma 2 full, whose trained embedding is tied to the LM head;
TR-DPO's moving reference copy in full mode; PPO's value adapter and head on GPT-2),
a run started from a saved adapter has that adapter as its reference (DPO's rewards 0 at step 0),
and a reward model's exports (adapter, merged) score as it did, with the normalisation they record."""

from __future__ import annotations

import json
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, PromptDataModule
from lit_rlhf.methods import DPO, PPO, AtomicCheckpointIO, ExportOnFitEnd, ResumableCheckpoint, RewardModeling
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.saving import META_FILE
from lit_rlhf.rollout.rewards import RewardScorer
from tests.methods.online_helpers import make_online
from tests.methods.tiny_families import PREFERENCE, build_families
from tests.paths import TOY_DATA

VAL = str(TOY_DATA / "preference_val.jsonl")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_families(tmp_path_factory.mktemp("families"), ["gpt2", "qwen2", "gemma2"])


def trainer(root, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, num_sanity_val_steps=0, max_steps=max_steps, **kwargs)


def dpo_fit(model: str, train_mode: str, root, max_steps: int, ckpt_path=None, **options) -> dict[str, torch.Tensor]:
    """DPO (LoRA dropout on: the RNG state is part of what a resume restores); its trainable tensors and
    (``full``) its reference copy at the end."""
    pl.seed_everything(0)
    method = DPO(bank=BankSpec(model=model, train_mode=train_mode, disable_dropout=False,
                               lora=LoraSpec(r=4, alpha=8, dropout=0.1)), learning_rate=3e-3, **options)
    data = PreferenceDataModule(VAL, batch_size=8, max_length=64, seed=3)
    fit = trainer(root, max_steps, limit_val_batches=0, callbacks=[ResumableCheckpoint(dirpath=root)],
                  plugins=[AtomicCheckpointIO()])
    fit.fit(method, data, ckpt_path=ckpt_path)
    if method.bank.full and method.bank.model.config.tie_word_embeddings:
        model_ = method.bank.model
        assert model_.get_output_embeddings().weight is model_.get_input_embeddings().weight
    return {n: p.detach().clone() for n, p in method.bank.named_parameters()
            if p.requires_grad or n.startswith("reference_model.")}


#: TR-DPO moves the reference every step; in full mode the checkpoint carries the frozen copy's weights.
TR_DPO = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)


@pytest.mark.parametrize(("family", "train_mode", "options"), [
    ("gpt2", "lora", {}), ("qwen2", "full", {}), ("gemma2", "full", {}), ("qwen2", "full", TR_DPO)],
    ids=["gpt2-lora", "qwen2-full", "gemma2-full", "qwen2-full-tr_dpo"])
def test_a_stopped_run_resumes_exactly_on_other_families(models, family, train_mode, options, tmp_path):
    straight = dpo_fit(models[family], train_mode, tmp_path / "straight", 4, **options)
    dpo_fit(models[family], train_mode, tmp_path / "a", 2, **options)
    resumed = dpo_fit(models[family], train_mode, tmp_path / "a" / "resumed", 4,
                      ckpt_path=tmp_path / "a" / "last.ckpt", **options)
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_a_run_started_from_a_saved_adapter_has_it_as_its_reference(models, tmp_path):
    model = models["qwen2"]
    torch.manual_seed(0)
    sft = AdapterBank(BankSpec(model=model, lora=LoraSpec(r=4, alpha=8)), require=[AdapterSpec("policy")])
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    sft.save_adapter("policy", tmp_path / "sft")

    method = DPO(bank=BankSpec(model=model, adapters=[AdapterSpec("policy", path=str(tmp_path / "sft"))]))
    method.configure_model()
    data = PreferenceDataModule(PREFERENCE, batch_size=4, max_length=64, seed=3)
    data.prepare(method.tokenizer)
    loss, metrics = method.compute_loss(next(iter(data.train_dataloader())))
    # Policy == reference at step 0: every implicit reward is 0 and the loss is log 2, although the
    # loaded policy is far from the bare base.
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0
    torch.testing.assert_close(loss, torch.tensor(2.0).log())
    assert metrics["logps/chosen"] != 0
    assert {n.split(".lora_")[1].split(".")[1] for n in method.bank.trainable_names()} == {"policy"}


@pytest.mark.parametrize(("family", "train_mode"), [("gpt2", "lora"), ("qwen2", "qlora"), ("gemma2", "full")])
def test_reward_exports_score_as_trained_with_the_normalisation_they_record(models, family, train_mode, tmp_path):
    pl.seed_everything(0)
    spec = BankSpec(model=models[family], train_mode=train_mode, lora=LoraSpec(r=4, alpha=8))
    method = RewardModeling(bank=spec, learning_rate=3e-2)
    data = PreferenceDataModule(VAL, val=VAL, batch_size=8, max_length=64, seed=3)
    trainer(tmp_path, 3, limit_val_batches=1, enable_checkpointing=False,
            callbacks=[ExportOnFitEnd(str(tmp_path / "export"), merged=True)]).fit(method, data)
    method.eval()
    batch = next(iter(data.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        trained = method.bank.score(ids, mask, adapter="reward")

    # The merged export (a QLoRA one: merged into the dequantized 4-bit weights), as scorers load it ...
    merged = tmp_path / "export" / "merged"
    reloaded = [(merged, RewardScorer.load(merged).model)]
    if train_mode != "full":  # ... and the adapter, on the base it was trained on, and as a scorer loads it
        adapter = tmp_path / "export" / "adapter"
        reloaded.append((adapter, AdapterBank(replace(spec, adapters=[
            AdapterSpec("reward", path=str(adapter), head="score", trainable=False)])).eval()))
        reloaded.append((adapter, RewardScorer.load(adapter).model))  # a QLoRA one: on the base quantized as recorded
    for export, bank in reloaded:
        with torch.no_grad():
            torch.testing.assert_close(bank.score(ids, mask, adapter="reward"), trained, atol=1e-5, rtol=1e-5)
        # The recorded statistics are those of the exported weights over the validation data.
        recorded = json.loads((export / META_FILE).read_text())["normalization"]
        method.bank = bank
        for key, value in method.score_statistics(data.val_dataloader()).items():
            assert value == pytest.approx(recorded[key], abs=1e-5), key


def ppo_fit(model: str, root, max_steps: int, ckpt_path=None) -> dict[str, torch.Tensor]:
    """PPO with its critic as a value adapter and head (dropout on, adaptive KL); its trainable tensors at the end."""
    pl.seed_everything(0)
    method = make_online(PPO, update_epochs=1, num_mini_batches=1, num_samples_per_prompt=2, max_new_tokens=4,
                         adaptive_kl=True, kl_coef=0.05, kl_target=0.1, kl_horizon=100)
    method.bank_spec.model, method.bank_spec.disable_dropout, method.bank_spec.lora.dropout = model, False, 0.1
    data = PromptDataModule(str(TOY_DATA / "prompt_val.jsonl"), batch_size=2, max_length=32, seed=3)
    trainer(root, max_steps, limit_val_batches=0, callbacks=[ResumableCheckpoint(dirpath=root)],
            plugins=[AtomicCheckpointIO()]).fit(method, data, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}


def test_a_stopped_ppo_run_resumes_its_critic_exactly_on_gpt2(models, tmp_path):
    straight = ppo_fit(models["gpt2"], tmp_path / "straight", 4)
    assert any(name.startswith("heads.value.") for name in straight)
    ppo_fit(models["gpt2"], tmp_path / "a", 2)
    resumed = ppo_fit(models["gpt2"], tmp_path / "a" / "resumed", 4, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
