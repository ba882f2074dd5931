"""GKD / KD / SeqKD: the loss is the JSD over completion tokens, the completion source follows
lmbda and seq_kd, the student moves towards the teacher, and the teacher stays frozen and apart."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaForCausalLM

from lit_rlhf.cli import main as cli_main
from lit_rlhf.data import PackingCollator, PromptDataModule, SFTCollator, SFTDataModule, Where, build_examples
from lit_rlhf.losses import generalized_jsd_loss
from lit_rlhf.methods.gkd import GKD, dataset_batch, dataset_prompts
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import SamplingConfig
from lit_rlhf.toy.build import build_tokenizer, tiny_config

from tests.paths import TOY_BASE, TOY_DATA, TOY_TEACHER


@pytest.fixture(autouse=True)
def one_thread():
    # The toy models are tiny: one thread is faster, and immune to other jobs on a small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_gkd(*, teacher: str | None = TOY_TEACHER, **kwargs) -> GKD:
    spec = BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16),
                    teacher=TeacherSpec(model=teacher) if teacher else None)
    kwargs.setdefault("sampling", SamplingConfig(max_new_tokens=10))
    return GKD(bank=spec, **kwargs)


def sft_data(batch_size: int = 16, **kwargs) -> SFTDataModule:
    return SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), val=str(TOY_DATA / "sft_val.jsonl"),
                         batch_size=batch_size, max_length=64, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), **kwargs)


class EngineSpy:
    """Wraps the method's rollout engine; records each call's adapter, whether it sampled from the
    teacher, and the rollout returned."""

    def __init__(self, method: GKD):
        self.engine = method.engine
        self.calls: list[dict] = []
        method.engine = self

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling, *, teacher=False):
        rollout = self.engine.generate(bank, adapter, prompt_ids, prompt_mask, sampling, teacher=teacher)
        self.calls.append({"adapter": adapter, "teacher": teacher, "rollout": rollout})
        return rollout


# -- the pieces -----------------------------------------------------------------------------------


def test_dataset_prompts_are_the_tokens_before_each_completion_left_padded():
    method = make_gkd()
    dm = sft_data(batch_size=5).prepare(method.tokenizer)
    examples = dm.train_examples[:5]
    batch = dm.collator(examples)
    prompt_ids, prompt_mask = dataset_prompts(batch, method.tokenizer.pad_token_id)
    width = max(len(e["prompt_ids"]) for e in examples)
    assert prompt_ids.shape == (5, width)
    for row, e in enumerate(examples):
        n = len(e["prompt_ids"])
        assert prompt_ids[row, width - n:].tolist() == e["prompt_ids"]
        assert prompt_mask[row].tolist() == [0] * (width - n) + [1] * n


def test_multi_turn_rows_distil_their_last_turn_only():
    """SFT trains every assistant turn of a ``messages`` row, GKD as before only the last: supervised KD's
    loss mask and the prompts on-policy / SeqKD rows are generated from are what they were without the
    earlier turns' mask, padded or packed."""
    tokenizer = make_gkd().tokenizer
    turn = [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": "good ."}]
    rows = [{"messages": turn * 2 + [{"role": "user", "content": "the book was"},
                                     {"role": "assistant", "content": "bad ."}]}, {"messages": turn}]
    examples, errors = build_examples("sft", [(Where("data.jsonl", i + 1, "line"), r) for i, r in enumerate(rows)],
                                      tokenizer)
    assert not errors and "prompt_loss_mask" in examples[0]
    last_only = [{k: v for k, v in e.items() if k != "prompt_loss_mask"} for e in examples]
    pad_id = tokenizer.pad_token_id
    for collator in (SFTCollator(pad_id), PackingCollator(pad_id)):
        batch, before = collator(examples), collator(last_only)
        assert (batch["completion_mask"] != before["completion_mask"]).any()  # SFT does train the earlier turns
        torch.testing.assert_close(dataset_batch(batch).completion_mask, before["completion_mask"])
    batch = SFTCollator(pad_id)(examples)
    prompt_ids, _ = dataset_prompts(batch, pad_id)
    assert prompt_ids[0].tolist() == examples[0]["prompt_ids"]


def test_loss_is_jsd_of_next_token_distributions_over_completion_tokens_by_hand():
    method = make_gkd(lmbda=0.0, beta=0.3, temperature=1.5)
    method.configure_model()
    dm = sft_data(batch_size=4).prepare(method.tokenizer)
    batch = dm.collator(dm.train_examples[:4])
    with torch.no_grad():
        rows, source = method.training_sequences(batch)
        student, teacher, mask = method.aligned_logits(rows)
        loss = method.divergence(student, teacher, mask, beta=0.3, temperature=1.5)
        with method.bank.role("policy"):
            s_full = method.bank(batch["input_ids"], batch["attention_mask"]).logits
        t_full = method.bank.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert source == "dataset"
    # Written out: for every completion token t >= 1, the JSD of the distributions at t - 1.
    total, count = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["completion_mask"][b, t]:
                total += generalized_jsd_loss(s_full[b, t - 1][None, None], t_full[b, t - 1][None, None],
                                              torch.ones(1, 1), beta=0.3, temperature=1.5)
                count += 1
    assert count == int(batch["completion_mask"][:, 1:].sum())
    torch.testing.assert_close(loss, total / count)


def test_teacher_null_is_the_base_without_adapters():
    method = make_gkd(teacher=None)
    method.configure_model()
    assert not method.bank.has_separate_teacher
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        # Move the policy away from the base so the check means something.
        for name, p in method.bank.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        with method.bank.teacher():
            teacher = method.bank(ids).logits
            with method.bank.reference():  # nested: the adapters stay off
                nested = method.bank(ids).logits
            after_nested = method.bank(ids).logits
        with method.bank.reference():
            reference = method.bank(ids).logits
        with method.bank.role("policy"):
            policy = method.bank(ids).logits
    torch.testing.assert_close(teacher, reference)
    torch.testing.assert_close(nested, reference)
    torch.testing.assert_close(after_nested, reference)
    assert not torch.allclose(policy, reference)


# -- where completions come from ------------------------------------------------------------------


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lmbda_zero_never_generates_and_one_always_does(tmp_path, lmbda):
    pl.seed_everything(0)
    method = make_gkd(lmbda=lmbda)
    spy = EngineSpy(method)
    trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(method, sft_data())
    assert method.distill_batches == 4
    if lmbda == 0.0:
        assert spy.calls == [] and method.on_policy_batches == 0
    else:
        assert len(spy.calls) == 4 and method.on_policy_batches == 4
        assert all(c["adapter"] == "policy" and not c["teacher"] for c in spy.calls)


def test_lmbda_half_mixes(tmp_path):
    pl.seed_everything(0)
    method = make_gkd(lmbda=0.5)
    spy = EngineSpy(method)
    trainer(tmp_path, max_steps=12, limit_val_batches=0).fit(method, sft_data(batch_size=4))
    assert 0 < len(spy.calls) < 12 and len(spy.calls) == method.on_policy_batches


def test_seq_kd_trains_on_teacher_generations(tmp_path):
    pl.seed_everything(0)
    method = make_gkd(lmbda=0.0, seq_kd=True)
    spy = EngineSpy(method)
    seen = []
    aligned_logits = method.aligned_logits

    def record(rows):
        seen.append(rows)
        return aligned_logits(rows)

    method.aligned_logits = record
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(method, sft_data())
    assert len(spy.calls) == 3 and method.on_policy_batches == 0
    # Sampled with teacher=True: the separate teacher model.
    assert all(c["adapter"] is None and c["teacher"] for c in spy.calls)
    for call, rows in zip(spy.calls, seen):
        rollout = call["rollout"]
        assert torch.equal(rows.input_ids, rollout.input_ids)
        assert torch.equal(rows.completion_mask[:, rollout.prompt_ids.shape[1]:], rollout.response_mask)
        assert rows.completion_mask[:, : rollout.prompt_ids.shape[1]].sum() == 0


def test_prompt_only_data_trains_on_policy_and_validates_on_teacher_completions(tmp_path):
    pl.seed_everything(0)
    method = make_gkd(lmbda=1.0)
    spy = EngineSpy(method)
    dm = PromptDataModule(str(TOY_DATA / "prompt_train.jsonl"), val=str(TOY_DATA / "prompt_val.jsonl"),
                          batch_size=8, max_length=32)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    fit.fit(method, dm)
    assert [c["adapter"] for c in spy.calls[:2]] == ["policy", "policy"]
    # Validation (prompt_val has 12 prompts: 2 batches) measures on the teacher's greedy completions.
    assert [(c["adapter"], c["teacher"]) for c in spy.calls[2:]] == [(None, True)] * 2
    assert fit.callback_metrics["val/kl_teacher"] > 0


def test_prompt_only_data_needs_every_batch_generated(tmp_path):
    method = make_gkd(lmbda=0.5)
    dm = PromptDataModule(str(TOY_DATA / "prompt_train.jsonl"), batch_size=8, max_length=32)
    with pytest.raises(ValueError, match="set lmbda: 1 or seq_kd: true"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(method, dm)


# -- the teacher: vocabulary check, frozen, not in checkpoints ----------------------------------------


def test_teacher_with_another_vocabulary_fails_before_training(tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["zebra", "quokka", "okapi"])
    other = tmp_path / "other_teacher"
    LlamaForCausalLM(tiny_config(tokenizer, hidden_size=32, num_layers=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    steps = []
    monkeypatch.setattr(GKD, "training_step", lambda self, batch, i: steps.append(i))
    root = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        cli_main(["fit", "--config", "configs/kd.yaml", "--trainer.default_root_dir", str(root),
                  "--model.init_args.bank.teacher.model", str(other), "--trainer.enable_progress_bar", "false"])
    message = str(info.value)
    student_size = len(build_tokenizer())
    assert str(other) in message and "assets/toy/base" in message
    assert f"teacher tokenizer: {student_size + 3} tokens" in message
    assert f"student tokenizer: {student_size} tokens" in message
    assert "same tokenizer" in message and "teacher: null" in message
    assert steps == [] and not (root / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_teacher_is_frozen_unchanged_and_absent_from_checkpoints(tmp_path):
    pl.seed_everything(0)
    method = make_gkd(lmbda=0.5, seq_kd=True)
    method.configure_model()
    teacher_before = {k: v.clone() for k, v in method.bank.teacher_model.state_dict().items()}
    lora_before = {n: p.detach().clone() for n, p in method.bank.named_parameters() if "lora_" in n}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        method, sft_data())

    teacher = method.bank.teacher_model
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    optimized = {id(p) for group in method.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    # The student did train.
    assert any(not torch.equal(p, lora_before[n]) for n, p in method.bank.named_parameters() if "lora_" in n)

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(saved["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert not any("teacher_model" in k for k in keys)
    assert saved["lit_rlhf_gkd"]["distill_batches"] == 4


@pytest.mark.parametrize("teacher_spec", [dict(quantization="4bit"), dict(quantization="8bit"), dict(dtype="bfloat16")])
def test_quantized_or_bf16_teacher_in_its_own_dtype(tmp_path, teacher_spec):
    pl.seed_everything(0)
    spec = BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16),
                    teacher=TeacherSpec(model=TOY_TEACHER, **teacher_spec))
    method = GKD(bank=spec, lmbda=0.5, seq_kd=True, learning_rate=1e-2, sampling=SamplingConfig(max_new_tokens=10))
    dm = sft_data()
    before = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    q_proj = method.bank.teacher_model.model.layers[0].self_attn.q_proj
    if "quantization" in teacher_spec:
        assert type(q_proj).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[teacher_spec["quantization"]]
    else:
        assert q_proj.weight.dtype == torch.bfloat16
    assert method.bank.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    # 8 steps take the held-out KL to 0.11-0.13 of its start in every teacher dtype (seeds 0-2; 0.08-0.18 after 16).
    trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(method, dm)
    after = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    assert after["val/kl_teacher"] < 0.5 * before["val/kl_teacher"]


# -- distillation moves the student towards the teacher ----------------------------------------------

STEPS = 16  # half an epoch of sft_train.jsonl at batch 16
KL_RATIO = 0.3  # the held-out KL must fall to under 30% of the base's


@pytest.mark.parametrize(
    "name, settings",
    [
        # GKD (on-policy samples mixed in) stands for the family in the default suite.
        pytest.param("kd", dict(lmbda=0.0, beta=0.0), marks=pytest.mark.slow),
        pytest.param("seqkd", dict(lmbda=0.0, seq_kd=True, beta=0.0), marks=pytest.mark.slow),
        ("gkd", dict(lmbda=0.5, beta=0.5)),
    ],
)
def test_distillation_lowers_held_out_kl_to_the_teacher(tmp_path, name, settings):
    pl.seed_everything(0)
    method = make_gkd(learning_rate=1e-2, warmup_steps=2, lr_scheduler="cosine", **settings)
    dm = sft_data()
    before = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    trainer(tmp_path, max_steps=STEPS, limit_val_batches=0, gradient_clip_val=1.0).fit(method, dm)
    after = trainer(tmp_path).validate(method, dm, verbose=False)[0]
    print(f"{name}: held-out KL(teacher||student) before {before['val/kl_teacher']:.4f} "
          f"after {after['val/kl_teacher']:.4f}")
    # Measured after 16 steps: 0.0711 -> 0.0063 (KD, seed 0), 0.0063 (SeqKD, seed 0), 0.0064-0.0070 (GKD,
    # seeds 0-3), about 10x (after 32 steps: 0.0052-0.0058, about 13x).
    assert after["val/kl_teacher"] < KL_RATIO * before["val/kl_teacher"]


# -- the shipped configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["gkd", "kd", "seqkd"])
def test_shipped_config_fits_and_exports(tmp_path, config):
    cli_main(["fit", "--config", f"configs/{config}.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("teacher_model" in k for k in saved["state_dict"])
