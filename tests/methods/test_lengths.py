"""Sequence lengths against the model's positions: a run whose longest row (+ the tokens it samples)
is past the model's last position stops at setup, naming the setting, before any weights load
(GPT-2 used to fail with an IndexError at the first long rollout; a Llama read positions it was never
trained at, silently)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoConfig

from lit_rlhf.data import PromptDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.inference import Policy, prompt_batches, sample
from lit_rlhf.methods import GKD, GRPO, KTO, SFT
from lit_rlhf.methods.gkd import dataset_batch, rollout_batch
from lit_rlhf.methods.lengths import check_positions, position_limit
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, TeacherSpec, load_tokenizer
from lit_rlhf.rollout import SamplingConfig, build_engine
from lit_rlhf.toy.families import POSITIONS, build_tiny

from tests.methods.online_helpers import TOY_REWARD, trainer
from tests.methods.tiny_families import TOL, build_families
from tests.rollout._rollout_helpers import gpt2_reward_model
from tests.paths import TOY_DATA

WORDS = "the movie was great fun but boring . "  # 8 toy words, one token each


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return build_families(tmp_path_factory.mktemp("families"), ["gpt2", "llama"])


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_online_run_past_the_models_positions_stops_at_setup_naming_max_new_tokens(family, families, tmp_path):
    key = "n_positions" if family == "gpt2" else "max_position_embeddings"
    # A prompt of 15 x 8 words (+ BOS) = 121 tokens; + 16 sampled ones is past the 128 positions.
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "the book was"}, {"prompt": WORDS * 15}])
    data = PromptDataModule(train=prompts, batch_size=2, max_length=None)
    grpo = GRPO(bank=BankSpec(model=families[family]), rewards=[TOY_REWARD], num_samples_per_prompt=2,
                sampling=SamplingConfig(max_new_tokens=16))
    with pytest.raises(InvalidArgument, match=rf"137 tokens.*{key}={POSITIONS}.*121-token prompt \+ "
                                              r"sampling.max_new_tokens=16") as refused:
        trainer(1).fit(grpo, datamodule=data)
    assert refused.value.argument == "sampling"
    assert grpo.bank is None, "refused before any weights load"


def test_a_separate_reward_model_past_its_positions_stops_the_run_at_setup(families, tmp_path):
    """The policy's 128 positions hold a 4-token prompt + 32 sampled tokens, a 32-position reward model does
    not: the run went on, to an IndexError at the first scoring of a long reply (cut at scoring now, with a warning:
    tests/rollout/test_rewards.py), and stops before any weights load."""
    reward_model = gpt2_reward_model(tmp_path / "rm", load_tokenizer(BankSpec(model=families["gpt2"])), positions=32)
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "the book was"}, {"prompt": "the movie was"}])
    grpo = GRPO(bank=BankSpec(model=families["gpt2"]), rewards=[{"kind": "model", "path": reward_model}],
                num_samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=32))
    with pytest.raises(InvalidArgument, match=r"36 tokens, past the 32 positions of the reward model .*n_positions=32"
                                              r".*4-token prompt \+ sampling.max_new_tokens=32"):
        trainer(1).fit(grpo, datamodule=PromptDataModule(train=prompts, batch_size=2))
    assert grpo.bank is None, "refused before any weights load"


def test_capped_prompts_fit_and_an_offline_row_past_the_positions_names_max_length(families, tmp_path):
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": WORDS * 15}])
    capped = PromptDataModule(train=prompts, batch_size=1, max_length=None, max_prompt_length=POSITIONS - 16,
                              truncation="truncate")
    capped.prepare(SFT(bank=BankSpec(model=families["gpt2"])).tokenizer)
    assert len(capped.train_examples[0]["prompt_ids"]) == POSITIONS - 16
    check_positions([("policy", families["gpt2"], False)], capped.train_examples, new_tokens=16)  # 128: fits exactly

    rows = write_rows(tmp_path / "sft.jsonl", [{"prompt": "the book was", "completion": WORDS * 16}])
    sft = SFT(bank=BankSpec(model=families["gpt2"]))
    with pytest.raises(ValueError, match=r"133 tokens.*n_positions=128.*data.init_args.max_length"):
        trainer(1).fit(sft, datamodule=SFTDataModule(train=rows, batch_size=1, max_length=None))
    assert sft.bank is None


def test_kto_kl_rows_of_rows_that_fit_stay_within_the_positions(families, tmp_path):
    """max_length: null, both rows fit GPT-2's 128 positions (116 and 117 tokens), but the first prompt
    with the second completion made a 226-token KL row: an IndexError at the first step. The KL rows are
    cut to the longest row, which the setup's check has read."""
    rows = write_rows(tmp_path / "unpaired.jsonl", [
        {"prompt": WORDS * 14, "completion": "fun .", "label": True},
        {"prompt": "the book was", "completion": WORDS * 14, "label": False}])
    kto = KTO(bank=BankSpec(model=families["gpt2"]))
    data = UnpairedDataModule(train=rows, batch_size=2, max_length=None)
    fit = trainer(1)
    fit.fit(kto, datamodule=data)  # GPT-2: IndexError before
    assert fit.global_step == 1
    assert data.collator(data.train_examples)["kl_input_ids"].shape[1] == 117


def test_rope_scaling_stretches_the_positions_a_config_states(families):
    assert position_limit(AutoConfig.from_pretrained(families["gpt2"])) == ("n_positions", POSITIONS)
    config = AutoConfig.from_pretrained(families["llama"])
    assert position_limit(config) == ("max_position_embeddings", POSITIONS)
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": POSITIONS}
    assert position_limit(config) == ("max_position_embeddings", 4 * POSITIONS)


LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
RELEASED = {  # name: (model_type, the released config's values, the positions its model card states)
    "llama-3.1": ("llama", dict(max_position_embeddings=131072, rope_scaling={**LLAMA3, "factor": 8.0}), 131072),
    "llama-3.2": ("llama", dict(max_position_embeddings=131072, rope_scaling={**LLAMA3, "factor": 32.0}), 131072),
    "qwen2.5+yarn": ("qwen2", dict(max_position_embeddings=32768, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 131072),
    "qwen3+yarn": ("qwen3", dict(max_position_embeddings=40960, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 131072),
    "phi-3.5-longrope": ("phi3", dict(max_position_embeddings=131072, original_max_position_embeddings=4096, rope_scaling={
        "type": "longrope", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48}), 131072),
    "gemma-3": ("gemma3_text", dict(max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                    rope_local_base_freq=10000.0), 131072),
    "gemma-3-multimodal": ("gemma3", dict(text_config=dict(max_position_embeddings=131072, rope_local_base_freq=10000.0,
                                                           rope_scaling={"rope_type": "linear", "factor": 8.0})), 131072),
    "mistral-sliding": ("mistral", dict(max_position_embeddings=32768, sliding_window=4096), 32768),
    "deepseek-v2-yarn-mscale": ("deepseek_v2", dict(max_position_embeddings=163840, rope_scaling={
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}), 163840),
    "vicuna-16k-linear": ("llama", dict(max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 4.0}),
                          16384),
    "dynamic-ntk": ("llama", dict(max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0}), 8192),
    "gpt2": ("gpt2", {}, 1024),
    "opt": ("opt", dict(max_position_embeddings=2048), 2048),
    "bloom": ("bloom", {}, None),
    "falcon-rw": ("falcon", dict(alibi=True, new_decoder_architecture=False), None),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_the_position_limit_of_released_configs_is_what_their_model_card_states(name):
    """Llama 3.2's llama3 factor 32 over 8192 made 262144 (its card: 128K); the others guard the rule."""
    model_type, values, card = RELEASED[name]
    found = position_limit(AutoConfig.for_model(model_type, **values))
    assert (found and found[1]) == card


def test_alibi_models_have_no_position_limit_and_rotary_falcon_its_table(tmp_path):
    # BLOOM and Falcon-RW add ALiBi biases: no position table, whatever Falcon's config class fills in.
    limits = {family: position_limit(AutoConfig.from_pretrained(build_tiny(family, tmp_path / family)))
              for family in ("bloom", "falcon_alibi", "falcon")}
    assert limits == {"bloom": None, "falcon_alibi": None, "falcon": ("max_position_embeddings", POSITIONS)}
    long_rows = [{"prompt_ids": [5] * 100, "completion_ids": [6] * 100}]
    check_positions([("policy", str(tmp_path / "falcon_alibi"), False)], long_rows, new_tokens=0)
    with pytest.raises(ValueError, match="200 tokens.*max_position_embeddings=128"):
        check_positions([("policy", str(tmp_path / "falcon"), False)], long_rows, new_tokens=0)


# -- packed rows: sequences past the sliding window, rows past the positions ------------------------


@pytest.fixture(scope="module")
def packing_families(tmp_path_factory):
    return build_families(tmp_path_factory.mktemp("packing"),
                          ["mistral", "gemma2", "gemma3_text", "gpt2", "falcon_alibi", "opt", "bloom"])


def sft_batches(method, path, max_length=None):
    """The same rows padded and packed (one packed row of every sequence)."""
    padded = SFTDataModule(path, batch_size=4, max_length=max_length).prepare(method.tokenizer)
    packed = SFTDataModule(path, batch_size=4, max_length=max_length, packing=True).prepare(method.tokenizer)
    return next(iter(padded.train_dataloader())), next(iter(packed.train_dataloader()))


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "gpt2"])
def test_packed_rows_past_the_sliding_window_and_the_positions_give_the_padded_loss(family, packing_families, tmp_path):
    # 21-61 token sequences (Mistral's and Gemma 2/3's window is 16) in one packed row of 156 (> 128 positions).
    rows = write_rows(tmp_path / "sft.jsonl", [{"prompt": "the book was", "completion": WORDS * n} for n in (2, 7, 3, 5)])
    method = SFT(bank=BankSpec(model=packing_families[family]))
    method.configure_model()
    padded, packed = sft_batches(method, rows)
    assert packed["input_ids"].shape == (1, 156) and packed["position_ids"].max() < POSITIONS
    with torch.no_grad():
        loss_padded, tokens_padded = method.compute_loss(padded)
        loss_packed, tokens_packed = method.compute_loss(packed)
    assert tokens_packed == tokens_padded
    torch.testing.assert_close(loss_packed, loss_padded, **TOL)


@pytest.mark.parametrize(("family", "reason"), [("opt", "its attention mask ignores position_ids"),
                                               ("bloom", "its attention mask ignores position_ids"),
                                               ("falcon_alibi", "its ALiBi biases count positions along the whole")])
def test_packing_on_a_model_that_reads_packed_rows_otherwise_is_refused(family, reason, packing_families):
    method = SFT(bank=BankSpec(model=packing_families[family]))
    method.configure_model()
    padded, packed = sft_batches(method, f"{TOY_DATA}/sft_train.jsonl", max_length=64)
    method.compute_loss(padded)  # padded batches need no check
    with pytest.raises(ValueError, match=rf"packing: true, but the policy model cannot read packed rows \({reason}.*"
                                         r"data.init_args.packing"):
        method.compute_loss(packed)


def test_supervised_kd_on_packed_rows_checks_student_and_teacher(packing_families):
    gkd = GKD(bank=BankSpec(model=packing_families["opt"]), lmbda=0.0)
    gkd.configure_model()
    _, packed = sft_batches(gkd, f"{TOY_DATA}/sft_train.jsonl", max_length=64)
    with pytest.raises(ValueError, match=r"packing: true, but the student model cannot read packed rows"):
        gkd.aligned_logits(dataset_batch(packed))


# -- sampling outside training (generate, chat, evaluate) ----------------------------------------------


def test_sampling_keeps_the_end_of_a_prompt_that_would_run_past_the_positions(families, caplog):
    bank = AdapterBank(BankSpec(model=families["gpt2"], adapters=[AdapterSpec("policy")])).eval()
    policy = Policy(bank, load_tokenizer(BankSpec(model=families["gpt2"])), "policy", families["gpt2"], None)
    # A chat history grown to 124 tokens; 16 new ones would run to position 139 of 128.
    long, short = WORDS * 15 + "the book was", "the movie was"
    batch = next(prompt_batches(policy, [long, short]))
    assert batch["prompt_input_ids"].shape[1] == 124
    sampling = SamplingConfig(do_sample=False, max_new_tokens=16, stop_token_ids=[])
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.inference"):
        texts, lengths, rollout = sample(policy, batch, sampling)  # GPT-2: IndexError before
    assert "keep their last 112" in caplog.text and rollout.prompt_ids.shape[1] == POSITIONS - 16
    assert lengths.tolist() == [16, 16]
    # The short prompt is untouched: its response is the one it gets alone.
    alone = sample(policy, next(prompt_batches(policy, [short])), sampling)[0]
    assert texts[1] == alone[0]
    with pytest.raises(InvalidArgument, match=r"max_new_tokens=128 leaves no room .*\(n_positions=128\)"):
        sample(policy, batch, SamplingConfig(max_new_tokens=POSITIONS))


# -- left padding: GPT-2's absolute positions are those of the prompt alone ----------------------------

PROMPTS = ["the book was", "i think the park is really good and the coffee", "honestly"]


def left_padded(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("engine", ["hf", "hf_static"])
def test_left_padded_rollouts_and_their_training_forward_read_each_row_at_its_own_positions(engine, families):
    bank = AdapterBank(BankSpec(model=families["gpt2"], adapters=[AdapterSpec("policy")])).eval()
    tokenizer = load_tokenizer(BankSpec(model=families["gpt2"]))
    sampling = SamplingConfig(do_sample=False, max_new_tokens=10, stop_token_ids=[]).resolved(tokenizer)
    ids, mask = left_padded(tokenizer, PROMPTS)
    rollout = build_engine(engine).generate(bank, "policy", ids, mask, sampling)
    with torch.no_grad(), bank.role("policy"):
        batch_logits = bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids).logits
    width = ids.shape[1]
    for i, prompt in enumerate(PROMPTS):
        alone = build_engine(engine).generate(bank, "policy", *left_padded(tokenizer, [prompt]), sampling)
        assert torch.equal(alone.response_ids[0], rollout.response_ids[i])
        with torch.no_grad(), bank.role("policy"):
            alone_logits = bank(alone.input_ids).logits[0]
        n = alone.prompt_ids.shape[1]
        torch.testing.assert_close(batch_logits[i, width - 1:], alone_logits[n - 1:], **TOL)


def test_seq_kd_teacher_and_student_read_the_teachers_samples_at_their_own_positions(families, tmp_path):
    teacher = build_tiny("gpt2", tmp_path / "teacher", seed=1)
    gkd = GKD(bank=BankSpec(model=families["gpt2"], teacher=TeacherSpec(model=str(teacher))), lmbda=0.0, seq_kd=True,
              sampling=SamplingConfig(do_sample=False, max_new_tokens=8, stop_token_ids=[]))
    gkd.configure_model()
    ids, mask = left_padded(gkd.tokenizer, PROMPTS)
    sampling = gkd.sampling.resolved(gkd.tokenizer, gkd.bank.model)
    rows = rollout_batch(gkd.generate({"prompt_input_ids": ids, "prompt_attention_mask": mask}, "teacher", sampling))
    with torch.no_grad():
        student, teacher_logits, loss_mask = gkd.aligned_logits(rows)
    width = ids.shape[1]
    for i, prompt in enumerate(PROMPTS):
        alone = torch.cat([gkd.tokenizer(prompt, return_tensors="pt")["input_ids"][0], rows.input_ids[i, width:]])[None]
        n = alone.shape[1] - 8
        assert loss_mask[i, width - 1:].sum() == 8 and loss_mask[i].sum() == 8
        with torch.no_grad(), gkd.bank.teacher():
            torch.testing.assert_close(teacher_logits[i, width - 1:], gkd.bank(alone).logits[0, n - 1:-1], **TOL)
        with torch.no_grad(), gkd.bank.role("policy"):
            torch.testing.assert_close(student[i, width - 1:], gkd.bank(alone).logits[0, n - 1:-1], **TOL)
