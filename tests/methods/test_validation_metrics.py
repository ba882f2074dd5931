"""Validation metrics are what one pass over the validation rows computes by hand: the reference a
validation-only run reads, KTO's margin over the epoch, and every row counted once under DDP."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.methods import DPO, GKD, GRPO, KTO, SFT, RewardModeling
from lit_rlhf.methods.gkd import dataset_batch
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import RewardSpec

from tests.methods.online_helpers import lora_off_zero, make_online, prompts, saved_random_adapter
from tests.paths import TOY_BASE, TOY_DATA, TOY_TEACHER


def validate(method, data, **kwargs) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         **kwargs)
    return trainer.validate(method, data, verbose=False)[0]


@pytest.mark.parametrize("cls", [DPO, KTO])
def test_validate_alone_reads_the_precomputed_reference_of_a_loaded_policy(cls, tmp_path):
    """``trainer.validate`` (no fit, so no ``on_fit_start``) with ``precompute_ref_logps``: before any step the
    policy is its reference, so every implicit reward is 0. Reading the base with adapters off instead (the
    reference a precomputing bank does not keep) gave DPO rewards -0.005 and 0.009."""
    spec = BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16),
                    adapters=[AdapterSpec("policy", path=saved_random_adapter(tmp_path / "sft", "policy"))])
    rows = ("preference" if cls is DPO else "unpaired")
    data_cls = PreferenceDataModule if cls is DPO else UnpairedDataModule
    data = data_cls(str(TOY_DATA / f"{rows}_val.jsonl"), val=str(TOY_DATA / f"{rows}_val.jsonl"), batch_size=8,
                    max_length=64)
    logged = validate(cls(bank=spec, precompute_ref_logps=True), data, limit_val_batches=2)
    assert logged["val/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logged["val/rewards/rejected"] == pytest.approx(0.0, abs=1e-5)


def hand_kto_rewards(method, data, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta * (log pi - log ref)`` of every row of the first ``batches`` validation batches, and their labels:
    the policy in eval mode (no dropout), the reference with adapters off."""
    rewards, labels = [], []
    method.bank.eval()
    with torch.no_grad():
        for _, batch in zip(range(batches), data.val_dataloader()):
            with method.bank.role("policy"):
                policy = method.completion_logps(batch).logps
            with method.bank.reference():
                reference = method.completion_logps(batch).logps
            rewards.append(method.beta * (policy - reference))
            labels.append(batch["labels"].bool())
    return torch.cat(rewards), torch.cat(labels)


def test_kto_validation_margin_is_the_epochs_desirable_mean_minus_its_undesirable_mean():
    """TRL's eval margin: the mean reward of the epoch's desirable rows minus its undesirable rows'. A mean of the
    batches' margins (weighted by their rows, batches of one class left out) differs when the batches' class
    balance does: 0.0087 against -0.0049 here (the sign flipped)."""
    torch.manual_seed(0)
    method = KTO(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), beta=0.5)
    method.configure_model()
    lora_off_zero(method.bank, 0.1)
    data = UnpairedDataModule(str(TOY_DATA / "unpaired_val.jsonl"), val=str(TOY_DATA / "unpaired_val.jsonl"),
                              batch_size=5, max_length=64).prepare(method.tokenizer)
    logged = validate(method, data, limit_val_batches=4)
    rewards, desirable = hand_kto_rewards(method, data, 4)
    assert 0 < int(desirable.sum()) < 20  # both classes, in unequal shares per batch
    chosen, rejected = rewards[desirable].mean().item(), rewards[~desirable].mean().item()
    assert logged["val/rewards/chosen"] == pytest.approx(chosen, rel=1e-4)
    assert logged["val/rewards/rejected"] == pytest.approx(rejected, rel=1e-4)
    assert logged["val/rewards/margins"] == pytest.approx(chosen - rejected, rel=1e-4)


def length_or_nan(prompts, completions):
    """The completion's length in characters, but NaN (a score ``nonfinite: skip`` drops) for prompts of odd length."""
    return [float("nan") if len(p) % 2 else float(len(c)) for p, c in zip(prompts, completions)]


def test_online_validation_score_is_the_mean_over_the_scored_responses_of_the_epoch():
    """GRPO's ``val/score``: the mean of the greedy responses' finite scores over the 12 validation prompts (batches
    of 5, 5 and 2). Each batch's mean of its finite scores, weighted by all its rows, gave 17.458 for 17.5 here."""
    torch.manual_seed(0)
    reward = RewardSpec("function", function=f"{__name__}:length_or_nan", nonfinite="skip")
    method = make_online(GRPO, rewards=(reward,), num_samples_per_prompt=2, max_new_tokens=4)
    logged = validate(method, prompts(batch_size=5), limit_val_batches=3)
    batch = next(iter(prompts(batch_size=12).prepare(method.tokenizer).val_dataloader()))
    with torch.no_grad():
        rollout = method.generate_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                          method.train_sampling.greedy())
        _, scored = method.score_responses(rollout, list(batch["prompts"]), batch.get("raw_prompts"), update_stats=False)
    finite = scored.scores[scored.scores.isfinite()]
    assert 0 < finite.numel() < 12
    assert logged["val/score"] == pytest.approx(finite.mean().item(), rel=1e-5)


def test_validation_inside_fit_runs_without_dropout_on_the_trained_weights():
    """SFT with the dropouts on in training (``disable_dropout: false``, LoRA dropout 0.5): the ``val/loss`` of the
    validation at the end of a one-step fit is the token mean a pass in eval mode computes on the trained weights."""
    torch.manual_seed(0)
    method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16, dropout=0.5), disable_dropout=False),
                 learning_rate=1e-2)
    rows = str(TOY_DATA / "sft_val.jsonl")
    data = SFTDataModule(rows, val=rows, batch_size=5, max_length=64, packing=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_steps=1, limit_train_batches=1, limit_val_batches=3,
                         num_sanity_val_steps=0)
    trainer.fit(method, data)
    assert method.bank.training  # back in train mode after validation
    nll, tokens = 0.0, 0
    method.bank.eval()
    with torch.no_grad():
        for _, batch in zip(range(3), data.val_dataloader()):  # 15 rows
            batch_nll, batch_tokens = method.nll(batch)
            nll, tokens = nll + batch_nll.item(), tokens + batch_tokens.item()
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(nll / tokens, rel=1e-5)


@pytest.mark.parametrize("split", ["val", "train"])
def test_reward_normalisation_reads_the_whole_split_on_rank_0_of_two(split):
    """The export (rank 0 only) records score statistics over every row of the split, not over rank 0's share that
    its loaders hold under DDP (the training loader's half: 48 of 96 rows, before)."""
    method = RewardModeling(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)), normalize_on=split)
    rows = str(TOY_DATA / "preference_val.jsonl")
    data = PreferenceDataModule(rows, val=rows, batch_size=8, max_length=64)
    data.trainer = SimpleNamespace(world_size=2, global_rank=0)  # what the loaders read of it
    data.prepare(method.tokenizer)
    method._trainer = SimpleNamespace(datamodule=data)
    assert len(data.val_dataloader()) == 6  # rank 0's share: 6 of the 12 batches
    read = [row for batch in method._reference_loader() for row in batch["input_ids"].tolist()]
    assert len(read) == 2 * 96  # chosen and rejected of every row


def test_gkd_validation_kl_is_the_token_mean_over_the_split_with_a_short_last_batch():
    """GKD's ``val/kl_teacher``: forward KL(teacher ‖ student), written out, summed over every completion token of
    the 96 validation rows (batches of 40, 40 and 16) and divided by their number; each row run alone here."""
    torch.manual_seed(0)
    method = GKD(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8), teacher=TeacherSpec(model=TOY_TEACHER)))
    rows = str(TOY_DATA / "sft_val.jsonl")
    data = SFTDataModule(rows, val=rows, batch_size=40, max_length=64, packing=False)
    logged = validate(method, data)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in data.val_examples:
            student, teacher, mask = method.aligned_logits(dataset_batch(data.collator([example])))
            teacher_logps, student_logps = teacher.log_softmax(-1).double(), student.log_softmax(-1).double()
            kl = (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
            total, tokens = total + (kl * mask).sum().item(), tokens + int(mask.sum())
    assert logged["val/kl_teacher"] == pytest.approx(total / tokens, rel=1e-4)
