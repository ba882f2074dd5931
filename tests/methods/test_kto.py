"""KTO: the reference point from mismatched pairs, the class-balance warning, and a policy that improves."""

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf import toy
from lit_rlhf.cli import main as cli_main
from lit_rlhf.data import DataError, UnpairedDataModule
from lit_rlhf.methods.kto import KTO, weight_balance_advice
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.toy.evaluate import mean_score

from tests.paths import REPO, TOY_BASE, TOY_DATA


def make_kto(**kwargs) -> KTO:
    return KTO(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), **kwargs)


def unpaired_data(**kwargs) -> UnpairedDataModule:
    return UnpairedDataModule(str(TOY_DATA / "unpaired_train.jsonl"), val=str(TOY_DATA / "unpaired_val.jsonl"),
                              max_length=64, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


# -- the step -------------------------------------------------------------------------------------


def test_step_uses_mismatched_pairs_for_the_reference_point():
    method = make_kto(beta=0.5, desirable_weight=1.5)
    method.configure_model()
    batch = next(iter(unpaired_data(batch_size=6).prepare(method.tokenizer).train_dataloader()))
    assert batch["kl_input_ids"].shape[0] == batch["input_ids"].shape[0] == batch["labels"].shape[0] == 6

    # A fresh LoRA adapter is the reference (B = 0): rewards and KL are 0, each loss is w * (1 - σ(0)).
    loss, metrics = method.compute_loss(batch)
    labels = batch["labels"]
    weights = torch.where(labels, 1.5, 1.0)
    torch.testing.assert_close(loss, (0.5 * weights).mean())
    assert metrics["kl"][0] == 0

    # Move the policy away from the reference; the KL is the clamped mean log-ratio on the kl_* rows.
    with torch.no_grad():
        for name, param in method.bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    loss, metrics = method.compute_loss(batch)
    with torch.no_grad():
        with method.bank.role("policy"):
            policy_kl = method.completion_logps(batch, "kl_").logps
        with method.bank.reference():
            ref_kl = method.completion_logps(batch, "kl_").logps
            ref = method.completion_logps(batch).logps
        with method.bank.role("policy"):
            policy = method.completion_logps(batch).logps
    z0 = (policy_kl - ref_kl).mean().clamp(min=0)
    torch.testing.assert_close(metrics["kl"][0], z0)
    rewards = 0.5 * (policy - ref)
    torch.testing.assert_close(metrics["rewards/chosen"][0], rewards[labels].mean())
    torch.testing.assert_close(metrics["rewards/rejected"][0], rewards[~labels].mean())
    torch.testing.assert_close(metrics["logps/chosen"][0], policy[labels].mean())
    assert metrics["rewards/chosen"][1] == int(labels.sum())
    expected = torch.where(labels, 1.5 * (1 - torch.sigmoid(0.5 * (policy - ref) - 0.5 * z0)),
                           1 - torch.sigmoid(0.5 * z0 - 0.5 * (policy - ref))).mean()
    torch.testing.assert_close(loss, expected)

    # Gradients reach the policy adapter only: the reference point and the reference are detached.
    loss.backward()
    trainable = set(method.bank.trainable_names())
    for name, param in method.bank.named_parameters():
        if name not in trainable:
            assert param.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bank.trainable_parameters())


def test_balance_advice_names_the_weights_that_balance():
    assert weight_balance_advice(213, 299, 1.5, 1.0) is None  # ratio 1.07
    advice = weight_balance_advice(213, 299, 1.0, 1.0)  # ratio 0.71
    assert "0.712" in advice and "desirable_weight in [1.404, 1.872]" in advice
    assert "undesirable_weight in [0.534, 0.712]" in advice
    assert weight_balance_advice(400, 100, 1.0, 1.0) is not None  # ratio 4
    assert "no undesirable rows" in weight_balance_advice(10, 0, 1.0, 1.0)


def test_fit_start_warns_once_when_unbalanced(tmp_path):
    with pytest.warns(UserWarning, match=r"KTO class balance .* = 0\.712 .* desirable_weight in \[1\.404, 1\.872\]") as record:
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(make_kto(), unpaired_data(batch_size=4))
    assert sum("KTO class balance" in str(w.message) for w in record) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(make_kto(desirable_weight=1.5), unpaired_data(batch_size=4))
    assert not any("KTO class balance" in str(w.message) for w in record)


# -- learning on the toy corpus -------------------------------------------------------------------


def test_kto_raises_ground_truth_score_on_held_out_prompts(tmp_path):
    pl.seed_everything(0)
    method = make_kto(beta=0.1, desirable_weight=1.5, learning_rate=3e-3, warmup_steps=5, lr_scheduler="cosine")
    # Measured gain: 1.17 (greedy -0.17 -> 1.0) on seeds 0-5 after one epoch; two epochs did no better
    # (0.67-1.17 over seeds 0-7), three worse (0.5-1.17, seed 1 at the 0.5 line).
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(method, unpaired_data(batch_size=16))
    method.eval()
    _, held_out = toy.split_prompts()
    before = mean_score(method.bank, method.tokenizer, held_out, adapter=None)
    after = mean_score(method.bank, method.tokenizer, held_out, adapter="policy")
    print(f"held-out ground-truth score before {before:.3f} after {after:.3f}")
    assert after > before + 0.5


# -- the shipped config and bad data --------------------------------------------------------------


def test_kto_config_fits_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/kto.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_kto_full_fine_tune_keeps_a_frozen_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/kto.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.bank.train_mode", "full", "--model.init_args.learning_rate", "1e-3",
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "lightning_logs" / "version_0" / "export" / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "the movie was", "completion": "great ."}, "label", "is missing"),
        ({"prompt": "the movie was", "completion": "great .", "label": "yes"}, "label", "is 'yes'; it must be a boolean"),
        ({"prompt": "the movie was", "completion": "great .", "label": 1}, "label", "is 1; it must be a boolean"),
        ({"prompt": "the movie was", "completion": "", "label": True}, "completion", "is empty"),
    ],
)
def test_bad_unpaired_row_fails_before_training(tmp_path, monkeypatch, row, field, problem):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad_unpaired.jsonl"
    good = {"prompt": "the food was", "completion": "good .", "label": True}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    root = tmp_path / "run"
    with pytest.raises(DataError) as info:
        cli_main(["fit", "--config", "configs/kto.yaml", "--trainer.default_root_dir", str(root),
                  "--data.init_args.train", str(bad)])
    assert f"{bad}:2: field '{field}': {problem}" in str(info.value)
    assert not root.exists()


# The toy data is unbalanced at the default weights; test_fit_start_warns_once_when_unbalanced checks the warning.
@pytest.mark.filterwarnings("ignore:KTO class balance:UserWarning")
def test_apo_zero_unpaired_skips_the_kl_rows_and_precomputed_reference_matches_live(tmp_path):
    """apo_zero_unpaired never runs the mismatched KL rows; with precompute_ref_logps the reference
    log-probs come from the batch and equal the live reference's."""
    pl.seed_everything(0)
    method = make_kto(beta=0.5, loss_type="apo_zero_unpaired", precompute_ref_logps=True, learning_rate=3e-3)
    data = unpaired_data(batch_size=6)
    calls = []
    completion_logps = method.completion_logps
    method.completion_logps = lambda batch, prefix="": (calls.append(prefix), completion_logps(batch, prefix))[1]
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(method, data)
    assert "kl_" not in calls
    assert not method.bank.full and method._ref_cache["train"].shape[0] == len(data.train_examples)
    batch = data.collator(data.train_examples[:6])
    with torch.no_grad(), method.bank.reference():
        live = completion_logps(batch).logps
    torch.testing.assert_close(batch["ref_logps"], live, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kto, apo_zero_unpaired"):
        make_kto(loss_type="apo")


def test_precomputed_reference_covers_the_kl_rows_and_no_reference_runs_in_training(tmp_path):
    """With ``kto`` and precompute_ref_logps the mismatched KL rows are fixed in the data (row i with the
    completion of row i+1) and their reference log-probs precomputed too: training steps run no
    reference forward, and the loss equals the one from a live reference on the same rows."""
    pl.seed_everything(0)
    method = make_kto(beta=0.5, desirable_weight=1.5, precompute_ref_logps=True, learning_rate=3e-3)
    data = unpaired_data(batch_size=6)
    in_training_step, reference_calls = [False], []
    reference, training_step = method.needs_reference, method.training_step

    def counting_training_step(batch, batch_idx):
        in_training_step[0] = True
        try:
            return training_step(batch, batch_idx)
        finally:
            in_training_step[0] = False

    method.training_step = counting_training_step
    method.configure_model()
    # Every way to the reference: the live role, and the starting policy that the precomputation reads.
    live_reference, starting_policy = method.bank.reference, method._starting_policy
    method.bank.reference = lambda: (reference_calls.append(in_training_step[0]), live_reference())[1]
    method._starting_policy = lambda: (reference_calls.append(in_training_step[0]), starting_policy())[1]
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(method, data)
    assert method.trainer.global_step == 3
    assert reference_calls and not any(reference_calls), "a reference forward ran inside a training step"
    assert method._ref_cache["train"].shape == (len(data.train_examples), 2)

    examples = data.train_examples
    assert examples[0]["kl_completion_ids"] == examples[1]["completion_ids"]
    batch = data.collator(examples[:6])
    assert batch["kl_input_ids"][0].tolist()[: len(examples[0]["prompt_ids"]) + len(examples[1]["completion_ids"])] == (
        examples[0]["prompt_ids"] + examples[1]["completion_ids"])
    live = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    with torch.no_grad():
        loss, metrics = method.compute_loss(batch)
        live_loss, live_metrics = method.compute_loss(live)
    assert metrics["rewards/chosen"][0].abs() > 1e-3, "the trained policy should have moved off the reference"
    with torch.no_grad(), live_reference():
        torch.testing.assert_close(batch["ref_kl_logps"], method.completion_logps(batch, "kl_").logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, live_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["kl"][0], live_metrics["kl"][0], atol=1e-5, rtol=0)
    assert not reference()
