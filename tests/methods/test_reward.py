"""Reward: Bradley-Terry on the score head, held-out accuracy, a saved adapter that scores alike anywhere."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_rlhf import toy
from lit_rlhf.cli import main as cli_main
from lit_rlhf.data import DataError, PreferenceDataModule
from lit_rlhf.methods import ExportOnFitEnd
from lit_rlhf.methods.reward import RewardModeling
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.rollout import RewardScorer, score_texts

from tests.paths import REPO, TOY_BASE, TOY_DATA

PREF_VAL = TOY_DATA / "preference_val.jsonl"
#: Held-out pair accuracy the toy reward model reaches reliably (after 2 epochs, seeds 0-3: accuracy
#: 0.96-0.98, agreement with toy.score 0.97-0.99; 3 epochs, as configs/reward.yaml trains, reach the same).
ACCURACY_THRESHOLD = 0.9


def make_reward(**kwargs) -> RewardModeling:
    return RewardModeling(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), **kwargs)


def preference_data(**kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(TOY_DATA / "preference_train.jsonl"), val=str(PREF_VAL), max_length=64, **kwargs)


def val_pairs() -> list[dict]:
    return [json.loads(line) for line in PREF_VAL.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward model trained as configs/reward.yaml does, for 2 of its 3 epochs, exported to a directory."""
    out = tmp_path_factory.mktemp("reward")
    pl.seed_everything(0)
    method = make_reward(center_coefficient=0.01, learning_rate=3e-3, warmup_steps=5, lr_scheduler="cosine")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                         callbacks=[ExportOnFitEnd(dirpath=str(out / "export"))])
    trainer.fit(method, preference_data(batch_size=16))
    method.eval()
    return method, out / "export" / "adapter"


# -- the step -------------------------------------------------------------------------------------


def test_loss_and_metrics_of_a_batch():
    method = make_reward(center_coefficient=0.01)
    method.configure_model()
    batch = next(iter(preference_data(batch_size=4).prepare(method.tokenizer).train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    chosen, rejected = method.pair_scores(batch)
    assert chosen.shape == rejected.shape == (4,) and chosen.dtype == torch.float32
    loss, correct, metrics = method.compute_loss(batch)
    expected = (-F.logsigmoid(chosen - rejected) + 0.01 * (chosen + rejected) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(correct, (chosen > rejected).float())
    torch.testing.assert_close(metrics["rewards/margins"], (chosen - rejected).mean())
    loss.backward()
    head = method.bank.heads["reward"].linear.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_score_is_read_at_the_last_real_token():
    method = make_reward()
    method.configure_model()
    scorer = RewardScorer(method.bank, method.tokenizer, batch_size=8)
    texts = ["the movie was great .", "honestly the food felt very very bad and sad and boring ."]
    together = scorer(texts)
    alone = [scorer([t])[0] for t in texts]  # no padding at all
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    # A (prompt, completion) pair is tokenised as a preference row is: the same as the joined string.
    assert scorer([("the movie was", "great .")]) == scorer(["the movie was great ."])


# -- the trained model ----------------------------------------------------------------------------


def test_held_out_accuracy(trained):
    _, adapter = trained
    pairs = val_pairs()
    chosen = score_texts(adapter, [(p["prompt"], p["chosen"]) for p in pairs])
    rejected = score_texts(adapter, [(p["prompt"], p["rejected"]) for p in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    # Against the ground-truth scorer on fresh pairs over held-out prompts, never seen in training.
    rng = random.Random(1)
    _, held_out = toy.split_prompts()
    fresh = []
    while len(fresh) < 200:
        a, b = (toy.sample_completion(rng, rng.uniform(-1, 1)) for _ in range(2))
        if toy.score(a) != toy.score(b):
            fresh.append((rng.choice(held_out), a, b))
    scores = score_texts(adapter, [(p, c) for p, a, b in fresh for c in (a, b)])
    agree = sum((scores[2 * i] > scores[2 * i + 1]) == (toy.score(a) > toy.score(b)) for i, (_, a, b) in enumerate(fresh))
    print(f"preference_val accuracy {accuracy:.3f}; agreement with toy.score on fresh pairs {agree / len(fresh):.3f}")
    assert accuracy >= ACCURACY_THRESHOLD
    assert agree / len(fresh) >= ACCURACY_THRESHOLD


def test_saved_adapter_records_normalization(trained):
    _, adapter = trained
    meta = json.loads((adapter / "lit_rlhf.json").read_text())
    assert meta["head"] == "score" and meta["base"]["hidden_size"] == 64
    assert Path(meta["base_model"]).resolve() == Path(TOY_BASE).resolve()
    pairs = val_pairs()
    scores = torch.tensor(score_texts(adapter, [(p["prompt"], p[k]) for k in ("chosen", "rejected") for p in pairs]),
                          dtype=torch.float64)
    norm = meta["normalization"]
    assert norm["count"] == 2 * len(pairs)
    assert norm["mean"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert norm["std"] == pytest.approx(scores.std(unbiased=False).item(), abs=1e-4)
    normalized = score_texts(adapter, ["the movie was great ."], normalize=True)[0]
    raw = score_texts(adapter, ["the movie was great ."])[0]
    assert normalized == pytest.approx((raw - norm["mean"]) / norm["std"], rel=1e-5)


FRESH_PROCESS = r"""
import json, sys
import torch
torch.set_num_threads(1)
from lit_rlhf.rollout import score_texts
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer
adapter, base, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# The PPO path: the adapter by path on the same base, scored through the bank.
spec = BankSpec(model=base, adapters=[AdapterSpec("reward", path=adapter, head="score", trainable=False)])
bank = AdapterBank(spec).eval()
enc = load_tokenizer(spec)([t + " </s>" for t in texts], return_tensors="pt", padding=True)
with torch.no_grad():
    bank_scores = bank.score(enc["input_ids"], enc["attention_mask"], adapter="reward").tolist()
print(json.dumps({"score_texts": score_texts(adapter, texts), "bank": bank_scores}))
"""


def test_fresh_process_loads_the_adapter_and_scores_identically(trained):
    method, adapter = trained
    texts = ["the movie was great fun .", "i think the car is awful and sad .", "my review of the book : it was ."]
    in_memory = RewardScorer(method.bank, method.tokenizer)(texts)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(adapter), TOY_BASE, json.dumps(texts)],
                            capture_output=True, text=True, env=env, cwd=str(adapter.parent), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert fresh["score_texts"] == in_memory  # bit for bit
    torch.testing.assert_close(torch.tensor(fresh["bank"]), torch.tensor(in_memory), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["hidden_size", "vocab_size"])
def test_adapter_refuses_a_different_base(trained, tmp_path, change):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lit_rlhf.toy.build import tiny_config

    _, adapter = trained
    tokenizer = AutoTokenizer.from_pretrained(TOY_BASE)
    config = tiny_config(tokenizer, hidden_size=32) if change == "hidden_size" else tiny_config(tokenizer)
    if change == "vocab_size":
        config.vocab_size += 8
    other = tmp_path / "other_base"
    LlamaForCausalLM(config).save_pretrained(str(other))
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ValueError, match=rf"adapter 'reward' .* different base model .*'{change}'"):
        score_texts(adapter, ["the movie was great ."], base=str(other))
    with pytest.raises(ValueError, match=change):
        AdapterBank(BankSpec(model=str(other), adapters=[AdapterSpec("reward", path=str(adapter), head="score")]))


# -- the shipped config and bad data --------------------------------------------------------------


def test_a_config_naming_the_earlier_class_name_still_builds(tmp_path, monkeypatch):
    # Runs made before the rename carry `lit_rlhf.methods.Reward` in their saved config.yaml.
    from lit_rlhf.cli import build_cli
    from lit_rlhf.methods import RewardModeling

    monkeypatch.chdir(REPO)
    config = tmp_path / "config.yaml"
    shipped = (REPO / "configs" / "reward.yaml").read_text()
    assert "class_path: lit_rlhf.methods.RewardModeling" in shipped
    config.write_text(shipped.replace("lit_rlhf.methods.RewardModeling", "lit_rlhf.methods.Reward"))
    method = build_cli(["--config", str(config)], run=False).model
    assert type(method) is RewardModeling and method.center_coefficient == 0.01


def test_reward_config_fits_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/reward.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    adapter = run / "export" / "adapter"
    assert (adapter / "head.safetensors").exists()
    assert set(json.loads((adapter / "lit_rlhf.json").read_text())["normalization"]) == {"mean", "std", "count"}


def test_full_fine_tune_exports_a_merged_model_with_its_head(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/reward.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.bank.train_mode", "full", "--model.init_args.learning_rate", "1e-3",
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    merged = tmp_path / "lightning_logs" / "version_0" / "export" / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "head.safetensors").exists()
    scores = score_texts(merged, ["the movie was great .", "the movie was bad ."], normalize=True)
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(scores)))


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "the movie was", "chosen": "great .", "rejected": ""}, "rejected", "is empty"),
        ({"prompt": "the movie was", "chosen": "great ."}, "rejected", "is missing"),
        ({"prompt": "the movie was", "chosen": ["great ."], "rejected": "bad ."}, "chosen", "is a list of messages"),
    ],
)
def test_bad_preference_row_fails_before_training(tmp_path, monkeypatch, row, field, problem):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad_preference.jsonl"
    good = {"prompt": "the food was", "chosen": "good .", "rejected": "bad ."}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps(row) + "\n")
    root = tmp_path / "run"
    with pytest.raises(DataError) as info:
        cli_main(["fit", "--config", "configs/reward.yaml", "--trainer.default_root_dir", str(root),
                  "--data.init_args.train", str(bad)])
    assert f"{bad}:3: field '{field}': {problem}" in str(info.value)
    assert not root.exists()


def test_per_row_margin_from_the_data_reaches_the_loss(tmp_path):
    """Preference rows with a `margin` (rows without one: 0): the loss is -logσ(r_c - r_r - m) per row."""
    rows = [dict(p, margin=m) if m is not None else p for p, m in zip(val_pairs()[:4], [0.5, None, 2.0, 1.0])]
    path = tmp_path / "margins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = make_reward()
    method.configure_model()
    with torch.no_grad():
        for name, p in method.bank.named_parameters():
            if "lora_B" in name or "heads" in name:
                p.normal_(0, 0.1)
    data = PreferenceDataModule(str(path), max_length=64).prepare(method.tokenizer)
    batch = data.collator(data.train_examples)
    torch.testing.assert_close(batch["margin"], torch.tensor([0.5, 0.0, 2.0, 1.0]))
    loss, _, _ = method.compute_loss(batch)
    chosen, rejected = method.pair_scores(batch)
    expected = -F.logsigmoid(chosen - rejected - batch["margin"]).mean()
    torch.testing.assert_close(loss, expected)
    assert (expected - (-F.logsigmoid(chosen - rejected).mean())).abs() > 1e-3  # the margins matter
