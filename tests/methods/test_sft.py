"""SFT: the loss is the mean NLL of completion tokens, packing changes nothing, perplexity falls."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.cli import main as cli_main
from lit_rlhf.data import DataError, SFTDataModule
from lit_rlhf.losses import completion_nll
from lit_rlhf.methods.sft import SFT
from lit_rlhf.models import BankSpec, LoraSpec

from tests.paths import REPO, TOY_BASE, TOY_DATA


def make_sft(**kwargs) -> SFT:
    method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), **kwargs)
    method.configure_model()
    return method


def datamodule(method, split="train", **kwargs) -> SFTDataModule:
    path = TOY_DATA / f"sft_{split}.jsonl"
    return SFTDataModule(str(path), val=str(TOY_DATA / "sft_val.jsonl"), max_length=64, **kwargs).prepare(method.tokenizer)


def hand_mean_nll(logits, input_ids, completion_mask) -> torch.Tensor:
    """Mean over completion tokens t >= 1 of -log softmax(logits[t - 1])[input_ids[t]], written out."""
    total, count = 0.0, 0
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if completion_mask[b, t]:
                total += -torch.log_softmax(logits[b, t - 1].double(), -1)[input_ids[b, t]]
                count += 1
    return total / count


# -- the loss -------------------------------------------------------------------------------------


def test_completion_nll_is_mean_nll_of_completion_tokens_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    input_ids = torch.tensor([[1, 4, 2, 6, 0], [3, 3, 5, 1, 2]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])  # row 0: last token is padding
    nll_sum, num_tokens = completion_nll(logits, input_ids, completion_mask)
    assert num_tokens.item() == 6
    torch.testing.assert_close((nll_sum / num_tokens).double(), hand_mean_nll(logits, input_ids, completion_mask))


def test_prompt_targets_carry_no_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9, requires_grad=True)
    input_ids = torch.tensor([[2, 5, 7, 1, 3, 8], [2, 4, 4, 6, 1, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    nll_sum, num_tokens = completion_nll(logits, input_ids, completion_mask)

    changed_prompt = input_ids.clone()
    changed_prompt[0, 1:3] = torch.tensor([0, 0])  # prompt tokens of row 0 (targets of positions 0, 1)
    changed_prompt[1, 1] = 8
    same_sum, same_tokens = completion_nll(logits, changed_prompt, completion_mask)
    assert torch.equal(same_sum, nll_sum) and torch.equal(same_tokens, num_tokens)

    changed_completion = input_ids.clone()
    changed_completion[0, 4] = 0
    assert not torch.equal(completion_nll(logits, changed_completion, completion_mask)[0], nll_sum)

    # No gradient reaches the logits that predict prompt tokens (positions t - 1 for prompt t >= 1).
    nll_sum.backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[1, :1].abs().sum() == 0
    assert logits.grad[0, 2].abs().sum() > 0


def test_packed_batch_starts_each_sequence_fresh():
    from lit_rlhf.data import PackingCollator

    # Two text rows (every token is completion) packed into one row.
    batch = PackingCollator(0)([{"prompt_ids": [], "completion_ids": [1, 2, 3]}, {"prompt_ids": [], "completion_ids": [4, 2, 1]}])
    torch.manual_seed(2)
    logits = torch.randn(1, 6, 5)
    _, num_tokens = completion_nll(logits, batch["input_ids"], batch["completion_mask"])
    assert num_tokens.item() == 4  # the two first tokens predict nothing, as in a padded batch


def test_method_loss_on_a_toy_batch_by_hand():
    method = make_sft()
    dm = datamodule(method, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["completion_mask"].shape
    # completion only: the prompt ("<s> the movie was") is out of the mask, every completion token in it
    lengths = batch["attention_mask"].sum(1)
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()
    assert (batch["completion_mask"][:, :2] == 0).all()
    loss, num_tokens = method.compute_loss(batch)
    with method.bank.role("policy"):
        logits = method.bank(batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(loss.double(), hand_mean_nll(logits, batch["input_ids"], batch["completion_mask"]))
    assert num_tokens == batch["completion_mask"][:, 1:].sum() and num_tokens < lengths.sum()

    full = datamodule(method, batch_size=4, completion_only_loss=False)
    full_batch = next(iter(full.train_dataloader()))
    assert torch.equal(full_batch["completion_mask"], full_batch["attention_mask"])
    assert method.compute_loss(full_batch)[1] > num_tokens


def test_packed_loss_equals_padded_loss():
    method = make_sft()
    padded = next(iter(datamodule(method, batch_size=8).train_dataloader()))
    packed = next(iter(datamodule(method, batch_size=8, packing=True).train_dataloader()))
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < 8
    loss_padded, tokens_padded = method.compute_loss(padded)
    loss_packed, tokens_packed = method.compute_loss(packed)
    assert tokens_packed == tokens_padded
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)


# -- learning on the toy corpus -------------------------------------------------------------------


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def test_sft_lowers_held_out_perplexity(tmp_path):
    pl.seed_everything(0)
    method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), learning_rate=3e-3,
                 warmup_steps=5, lr_scheduler="cosine")
    dm = SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), val=str(TOY_DATA / "sft_val.jsonl"),
                       batch_size=16, max_length=64, packing=True)
    before = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    # val/ppl is token-weighted over the epoch: exp(total NLL / total tokens), by hand here.
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            nll_sum, num_tokens = method.nll(batch)
            total_nll, total_tokens = total_nll + nll_sum.item(), total_tokens + num_tokens.item()
    assert before["val/ppl"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert before["val/ppl"] == pytest.approx(math.exp(before["val/loss"]), rel=1e-5)

    trainer(tmp_path, max_epochs=1).fit(method, dm)
    after = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    print(f"held-out ppl before {before['val/ppl']:.3f} after {after['val/ppl']:.3f}")
    # The demonstrations are random words leaning positive, so the floor is high: 14.33 -> 13.42 here.
    assert after["val/ppl"] < 0.97 * before["val/ppl"]


def test_multi_turn_rows_train_every_assistant_turn(tmp_path):
    """A short fit on multi-turn ``messages`` rows: the loss is over every assistant turn's tokens (the toy
    template's word tokens and its ``</s>`` turn end), counted by hand, padded and packed alike, and it trains."""
    pl.seed_everything(0)
    words = ["good .", "bad really .", "very nice fun .", "sad ."]
    rows = [{"messages": [m for j in range(3) for m in (
        {"role": "user", "content": f"the movie was {words[(i + j) % 4]}"},
        {"role": "assistant", "content": words[(i + j + 1) % 4]})]} for i in range(8)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = make_sft(learning_rate=3e-3)
    loss_tokens = sum(len(m["content"].split()) + 1 for r in rows[:4] for m in r["messages"] if m["role"] == "assistant")
    for packing in (False, True):
        dm = SFTDataModule(str(path), val=str(path), batch_size=4, max_length=64, packing=packing)
        dm.prepare(method.tokenizer)
        with torch.no_grad():
            assert method.nll(dm.collator(dm.train_examples[:4]))[1].item() == loss_tokens
    before = trainer(tmp_path).validate(method, dm, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_steps=4).fit(method, dm)
    after = trainer(tmp_path).validate(method, dm, verbose=False)[0]["val/loss"]
    assert after < before


# -- the shipped config and bad data --------------------------------------------------------------


def test_sft_config_fits_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/sft.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    meta = json.loads((run / "export" / "adapter" / "lit_rlhf.json").read_text())
    assert meta["head"] is None and (run / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_sft_full_fine_tune(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["fit", "--config", "configs/sft.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.bank.train_mode", "full", "--model.init_args.learning_rate", "1e-3",
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    merged = tmp_path / "lightning_logs" / "version_0" / "export" / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()


def test_bad_sft_row_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad_sft.jsonl"
    rows = [{"prompt": "the movie was", "completion": "great ."}, {"prompt": "the food was", "completion": "  "}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    with pytest.raises(DataError) as info:
        cli_main(["fit", "--config", "configs/sft.yaml", "--trainer.default_root_dir", str(root),
                  "--data.init_args.train", str(bad)])
    assert f"{bad}:2: field 'completion': is empty" in str(info.value)
    assert not root.exists()
