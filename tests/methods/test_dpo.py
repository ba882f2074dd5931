"""DPO family as LightningModules: learning on the toy task, modes, resume, export, CLI."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf.data import PreferenceDataModule, UnpairedDataModule
from lit_rlhf.losses import dpo_loss
from lit_rlhf.methods import DPO, KTO
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec

from tests.methods.online_helpers import greedy_and_sampled_scores, perturbed, saved_random_adapter

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
    trainer(tmp_path, max_epochs=1).fit(method, data)
    before, after, sampled_before, sampled_after = greedy_and_sampled_scores(method)
    # Measured after one epoch (seeds 0-3): greedy -0.17 -> 0.81-1.0, sampled 0.01 -> 0.70-0.76 (two epochs:
    # greedy 1.0, sampled 0.49-0.76).
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


# The resumed Trainer deliberately lacks the checkpoint callback: only the checkpoint's own state may matter.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
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


@pytest.mark.parametrize("cls", [DPO, KTO])
def test_precomputed_reference_of_a_loaded_policy_is_that_policy_not_the_bare_base(cls, tmp_path):
    """Started from a saved SFT adapter, the reference is that adapter (the frozen copy a live reference reads),
    precomputed or not; precomputing keeps no copy, and read the base with adapters off instead."""
    dpo = cls is DPO
    rows = str(VAL if dpo else "assets/toy/data/unpaired_val.jsonl")
    data_cls, row_logps = ((PreferenceDataModule, DPO._chosen_and_rejected_logps) if dpo
                           else (UnpairedDataModule, KTO._reference_rows))
    balanced = {} if dpo else dict(desirable_weight=2.5)  # 31 desirable rows to 65
    spec = BankSpec(lora=LoraSpec(r=8, alpha=16),
                    adapters=[AdapterSpec("policy", path=saved_random_adapter(tmp_path / "sft", "policy"))])
    pl.seed_everything(0)
    data = data_cls(train=rows, batch_size=8, max_length=64)
    cached = cls(bank=spec, precompute_ref_logps=True, **balanced)
    trainer(tmp_path, max_steps=1).fit(cached, data)
    batch = data.collator(data.train_examples[:8])
    for reference, close in (("start", True), ("base", False)):
        live = cls(bank=replace(spec, reference=reference))
        live.configure_model()
        with live.bank.reference():
            expected = row_logps(live, batch)
        assert torch.allclose(cached._ref_cache["train"][:8], expected, atol=1e-5, rtol=0) == close, reference


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


# -- DPO options (TRL 1.16 parity): each checked against its formula on a real batch ---------------------

def _perturbed(method):
    perturbed(method)
    method.bank.eval()
    return method


def _batch(method, rows=6):
    data = PreferenceDataModule(train=VAL, batch_size=rows, max_length=64)
    data.prepare(method.tokenizer)
    return data.collator(data.train_examples[:rows])


def _token_table(method, batch, adapter="policy"):
    """Per-row lists of (log p(token), log Σ_v p(v)²) of the completion tokens, by plain loops."""
    with torch.no_grad(), method.bank.role(adapter):
        logits = method.bank(batch["input_ids"], batch["attention_mask"]).logits.double()
    rows = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(1, logits.shape[1]):
            if batch["completion_mask"][b, t]:
                probs = torch.softmax(logits[b, t - 1], dim=-1)
                row.append((math.log(probs[batch["input_ids"][b, t]].item()), math.log((probs**2).sum().item())))
        rows.append(row)
    return rows


def test_weighted_loss_types_and_rpo_alpha_sum_the_losses_by_hand():
    method = _perturbed(small_dpo(loss_type=["sigmoid", "bco_pair", "ipo"], loss_weights=[0.8, 0.2, 0.5],
                                  rpo_alpha=0.3))
    batch = _batch(method)
    loss, _ = method.compute_loss(batch)
    policy = method.policy_pair_logps(batch)
    with method.bank.reference():
        ref = method.pair_logps(batch)
    args = (policy.chosen, policy.rejected, ref.chosen, ref.rejected)
    lengths = dict(chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths)
    nll = -policy.chosen / policy.chosen_lengths
    expected = (0.8 * dpo_loss(*args, beta=1.0).losses.mean()
                + 0.2 * dpo_loss(*args, beta=1.0, loss_type="bco_pair").losses.mean()  # δ = 0: no training batch yet
                + 0.5 * dpo_loss(*args, beta=1.0, loss_type="ipo", **lengths).losses.mean()
                + 0.3 * nll.mean())
    torch.testing.assert_close(loss, expected)


def test_ld_alpha_weighs_the_tokens_beyond_the_shorter_completion():
    method = _perturbed(small_dpo(ld_alpha=0.25))
    batch = _batch(method)
    table = _token_table(method, batch)
    half = len(table) // 2
    expected_chosen, expected_rejected = [], []
    for c, r in zip(table[:half], table[half:]):
        shared = min(len(c), len(r))
        for row, out in ((c, expected_chosen), (r, expected_rejected)):
            out.append(sum(lp for lp, _ in row[:shared]) + 0.25 * sum(lp for lp, _ in row[shared:]))
    assert any(len(c) != len(r) for c, r in zip(table[:half], table[half:]))  # else LD changes nothing
    with method.bank.role("policy"):
        got = method.pair_logps(batch)
    torch.testing.assert_close(got.chosen.double(), torch.tensor(expected_chosen, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.rejected.double(), torch.tensor(expected_rejected, dtype=torch.float64), atol=1e-4, rtol=1e-5)


def test_use_weighting_multiplies_each_pair_by_its_wpo_weight():
    method = _perturbed(small_dpo(use_weighting=True))
    batch = _batch(method)
    table = _token_table(method, batch)
    half = len(table) // 2

    def w(row):
        return math.exp(sum(lp - lss for lp, lss in row) / len(row))

    weights = torch.tensor([w(c) * w(r) for c, r in zip(table[:half], table[half:])])
    policy = method.policy_pair_logps(batch)
    torch.testing.assert_close(policy.wpo_weights, weights.float(), atol=1e-5, rtol=1e-4)
    with method.bank.reference():
        ref = method.pair_logps(batch)
    loss, _ = method.compute_loss(batch)
    plain = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=1.0).losses
    torch.testing.assert_close(loss, (plain * policy.wpo_weights).mean())


def test_f_divergence_reaches_the_loss():
    method = _perturbed(small_dpo(f_divergence="alpha_divergence", f_alpha=0.3))
    batch = _batch(method)
    loss, _ = method.compute_loss(batch)
    policy = method.policy_pair_logps(batch)
    with method.bank.reference():
        ref = method.pair_logps(batch)
    u_c, u_r = torch.exp(policy.chosen - ref.chosen), torch.exp(policy.rejected - ref.rejected)
    h = (u_c ** -0.7 - 1) / -0.7 - (u_r ** -0.7 - 1) / -0.7
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(h).mean())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(loss_type="kto"), "valid names are sigmoid, ipo"),
    (dict(loss_type=["sigmoid", "nope"]), "unknown loss_type 'nope'"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "1 loss_weights for 2 loss types"),
    (dict(f_divergence="forward_kl", loss_type="bco_pair"), "undefined for loss_type"),
    (dict(f_divergence="chi2"), "valid names are reverse_kl"),
    (dict(use_weighting=True, loss_type="aot"), "aot"),
    (dict(ld_alpha=1.5), "ld_alpha must be in"),
    (dict(discopop_tau=0.0), "discopop_tau"),
    (dict(sync_ref_model=True, precompute_ref_logps=True), "needs a live reference"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha"),
    (dict(label_smoothing=0.5), "label_smoothing"),
])
def test_bad_dpo_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_dpo(**kwargs)


def test_mix_adapter_weights_is_a_convex_step_toward_the_policy():
    from lit_rlhf.methods.dpo import mix_adapter_weights

    method = _configured(small_dpo(sync_ref_model=True))
    params = dict(method.bank.named_parameters())
    ref_names = [n for n in params if ".policy_reference." in n]
    assert ref_names and not any(params[n].requires_grad for n in ref_names)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if ".policy." in name or ".policy_reference." in name:
                p.normal_()
    before = {n: params[n].detach().clone() for n in ref_names}
    mix_adapter_weights(method.bank, "policy", "policy_reference", 0.3)
    for name in ref_names:
        policy = params[name.replace(".policy_reference.", ".policy.")]
        torch.testing.assert_close(params[name], 0.3 * policy + 0.7 * before[name])


def test_tr_dpo_reference_follows_the_policy(tmp_path):
    """With α = 1 and a sync after every step, the reference is the policy of the last step: the
    implicit rewards are 0 again, while against the bare base they are not."""
    pl.seed_everything(0)
    method = small_dpo(sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)
    data = PreferenceDataModule(train=VAL, batch_size=8, max_length=64)
    trainer(tmp_path, max_steps=3).fit(method, data)
    assert method._last_sync_step == 3
    method.bank.eval()
    batch = data.collator(data.train_examples[:8])
    _, metrics = method.compute_loss(batch)
    assert metrics["rewards/chosen"].abs() < 1e-5 and metrics["rewards/rejected"].abs() < 1e-5
    with method.bank.reference():
        base = method.pair_logps(batch)
    assert (method.policy_pair_logps(batch).chosen - base.chosen).abs().max() > 1e-3


def test_tr_dpo_reference_from_a_saved_adapter_starts_as_that_adapter(tmp_path):
    """TR-DPO from a saved SFT adapter: the moving reference is the SFT adapter at step 0, whole: the LM head
    it trained (``modules_to_save``) and every module it targets, whatever the bank's own ``lora`` says (a fresh
    reference adapter read the original head and only the bank's target modules)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lit_rlhf.methods.dpo import mix_adapter_weights
    from tests.paths import TOY_BASE

    start = tmp_path / "sft"
    torch.manual_seed(0)
    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(TOY_BASE), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p), alpha=0.1)
    saved.save_pretrained(start)
    method = _configured(small_dpo(bank=BankSpec(lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                                 adapters=[AdapterSpec("policy", path=str(start))]),
                                   sync_ref_model=True))
    # The moving reference is the only copy: no unused frozen `reference` adapter beside it.
    assert sorted(method.bank.model.peft_config) == ["policy", "policy_reference"]
    method._start_synced_reference()
    data = PreferenceDataModule(train=VAL, batch_size=4, max_length=64).prepare(method.tokenizer)
    batch = data.collator(data.train_examples[:4])
    method.bank.eval()

    def assert_reference_is_policy():
        with torch.no_grad():
            policy, reference = method.policy_pair_logps(batch), method.reference_pair_logps(batch)
        torch.testing.assert_close(reference.chosen, policy.chosen)
        torch.testing.assert_close(reference.rejected, policy.rejected)

    assert_reference_is_policy()
    # A sync carries the policy's trained LM head copy too (α = 1: the reference is the policy again).
    params = dict(method.bank.named_parameters())
    with torch.no_grad():
        params["model.base_model.model.lm_head.modules_to_save.policy.weight"].add_(0.5)
    mix_adapter_weights(method.bank, "policy", "policy_reference", 1.0)
    assert_reference_is_policy()
