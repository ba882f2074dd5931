"""Reward sources: function by name, weights, normalisation, clipping, the missing-EOS rule, the
reward adapter on the policy's bank, and a separate model whose tokenizer differs."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

from lit_rlhf import toy
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.rollout import FunctionReward, ModelReward, RewardRequest, Rewards, RewardSpec, load_function
from lit_rlhf.toy.build import CHAT_TEMPLATE, SPECIAL, tiny_config

from tests.paths import TOY_BASE
from tests.rollout._rollout_helpers import make_rollout

PROMPTS = ["the book was", "i think the park is", "the food was", "honestly the car felt"]
COMPLETIONS = ["good great .", "bad and sad .", "it was fun but boring", "very happy ."]


def request(tokenizer, ended=None):
    return RewardRequest(PROMPTS, COMPLETIONS, make_rollout(tokenizer, PROMPTS, COMPLETIONS, ended))


@pytest.fixture
def length_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def words(prompts, completions):\n    return [float(len(c.split())) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:words"


def test_function_source_by_module_function_name(tokenizer):
    scores = FunctionReward("lit_rlhf.toy:reward")(request(tokenizer))
    assert scores.tolist() == pytest.approx([toy.score(c) for c in COMPLETIONS])
    assert load_function("lit_rlhf.toy.evaluate:mean_score").__name__ == "mean_score"
    with pytest.raises(ValueError, match="module:function"):
        load_function("lit_rlhf.toy.reward")
    with pytest.raises(AttributeError, match="no attribute"):
        load_function("lit_rlhf.toy:nope")


def test_weighted_sum_by_hand(tokenizer, length_module):
    rewards = Rewards([RewardSpec("function", function="lit_rlhf.toy:reward", weight=2.0),
                       RewardSpec("function", function=length_module, weight=-0.5)])
    out = rewards(request(tokenizer))
    expected = [2.0 * toy.score(c) - 0.5 * len(c.split()) for c in COMPLETIONS]
    assert out.scores.tolist() == pytest.approx(expected)
    assert out.per_source["reward"].tolist() == pytest.approx([toy.score(c) for c in COMPLETIONS])
    assert out.per_source["words"].tolist() == pytest.approx([len(c.split()) for c in COMPLETIONS])


def test_missing_eos_penalty_and_replacement(tokenizer):
    ended = [True, False, True, False]
    raw = [toy.score(c) for c in COMPLETIONS]
    penalised = Rewards([RewardSpec("function", function="lit_rlhf.toy:reward")], missing_eos_penalty=0.7)
    out = penalised(request(tokenizer, ended))
    assert out.scores.tolist() == pytest.approx([r if e else r - 0.7 for r, e in zip(raw, ended)])
    replaced = Rewards([RewardSpec("function", function="lit_rlhf.toy:reward")], missing_eos_score=-1.0)
    assert replaced(request(tokenizer, ended)).scores.tolist() == pytest.approx(
        [r if e else -1.0 for r, e in zip(raw, ended)]
    )


def test_fixed_normalisation_then_clipping_by_hand(tokenizer, length_module):
    rewards = Rewards([RewardSpec("function", function=length_module, normalize="fixed", mean=3.0, std=2.0, weight=3.0)],
                      clip=1.0)
    out = rewards(request(tokenizer))
    by_hand = [max(-1.0, min(1.0, 3.0 * (len(c.split()) - 3.0) / 2.0)) for c in COMPLETIONS]
    assert out.scores.tolist() == pytest.approx(by_hand)


def test_running_normalisation_by_hand(tokenizer, length_module):
    rewards = Rewards([RewardSpec("function", function=length_module, normalize="running")])
    first = rewards(request(tokenizer)).scores
    seen = [float(len(c.split())) for c in COMPLETIONS]
    mean, std = sum(seen) / 4, math.sqrt(sum((x - sum(seen) / 4) ** 2 for x in seen) / 3)
    assert first.tolist() == pytest.approx([(x - mean) / std for x in seen], rel=1e-5)
    second = rewards(request(tokenizer)).scores  # statistics over both batches (8 values)
    all_seen = seen * 2
    mean2 = sum(all_seen) / 8
    std2 = math.sqrt(sum((x - mean2) ** 2 for x in all_seen) / 7)
    assert second.tolist() == pytest.approx([(x - mean2) / std2 for x in seen], rel=1e-5)
    frozen = rewards(request(tokenizer), update_stats=False).scores
    assert torch.allclose(frozen, second)
    # The statistics round-trip through a state dict (checkpoints).
    restored = Rewards([RewardSpec("function", function=length_module, normalize="running")])
    restored.load_state_dict(json.loads(json.dumps(rewards.state_dict())))
    assert torch.allclose(restored(request(tokenizer), update_stats=False).scores, second)


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A saved score adapter on the toy base, with normalisation statistics in its lit_rlhf.json."""
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", head="score")]))
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter, so that "which adapter ran" shows in the scores
    path = tmp_path_factory.mktemp("rm") / "reward"
    bank.save_adapter("reward", path, metadata={"normalization": {"mean": 0.25, "std": 2.0}})
    return str(path)


def test_reward_adapter_on_the_bank_restores_the_policy(tokenizer, reward_adapter):
    bank = AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("policy"),
                                                     AdapterSpec("reward", path=reward_adapter, trainable=False)]),
                       require=[AdapterSpec("reward", head="score")]).eval()
    rewards = Rewards([RewardSpec("adapter", adapter="reward")])
    rewards.setup(bank, tokenizer)
    req = request(tokenizer)
    with bank.role("policy"):
        out = rewards(req)
        assert bank.active == "policy"
    r = req.rollout
    with torch.no_grad():
        by_hand = bank.score(r.input_ids, r.attention_mask, adapter="reward", position_ids=r.position_ids)
    assert torch.equal(out.scores, by_hand)
    assert rewards.adapter_names == ["reward"]

    saved = Rewards([RewardSpec("adapter", adapter="reward", normalize="saved")])
    saved.setup(bank, tokenizer)
    assert saved(req).scores.tolist() == pytest.approx(((by_hand - 0.25) / 2.0).tolist(), rel=1e-5)


def test_saved_normalisation_missing_is_an_error(tokenizer, length_module):
    rewards = Rewards([RewardSpec("function", function=length_module, normalize="saved")])
    with pytest.raises(ValueError, match="normalization"):
        rewards.setup(None, tokenizer)


def permuted_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer with its word ids in reverse order (same words, different ids)."""
    words = list(reversed(toy.vocabulary()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=list(SPECIAL[4:]),
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_separate_model_with_another_tokenizer_rescores_the_text(tmp_path, tokenizer):
    other = permuted_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(other, hidden_size=32, num_layers=1)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    other.save_pretrained(tmp_path / "rm")

    ended = [True, True, False, True]
    req = request(tokenizer, ended)
    source = ModelReward(str(tmp_path / "rm"))
    source.setup()
    scores = source(req)

    by_hand = []
    for prompt, completion, e in zip(PROMPTS, COMPLETIONS, ended):
        ids = other(f"{prompt} {completion}")["input_ids"] + ([other.eos_token_id] if e else [])
        with torch.no_grad():
            by_hand.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert scores.tolist() == pytest.approx(by_hand, abs=1e-5)
    # The ids really differ between the two tokenizers, so feeding the policy's ids would be wrong.
    assert other("the book was")["input_ids"] != tokenizer("the book was")["input_ids"]


def test_separate_reward_adapter_dir_scores_like_the_same_adapter_on_the_bank(tokenizer, reward_adapter):
    req = request(tokenizer, [True, False, True, True])
    separate = ModelReward(reward_adapter)  # its base is read from adapter_config.json
    separate.setup()
    bank = AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", path=reward_adapter, trainable=False,
                                                                      head="score")])).eval()
    r = req.rollout
    with torch.no_grad():
        on_bank = bank.score(r.input_ids, r.attention_mask, adapter="reward", position_ids=r.position_ids)
    assert separate(req).tolist() == pytest.approx(on_bank.tolist(), abs=1e-5)
    assert separate.saved_normalization() == {"mean": 0.25, "std": 2.0}


def test_a_merged_reward_export_is_read_with_its_head_and_statistics(tmp_path, tokenizer, reward_adapter):
    """A merged lit_rlhf reward model (save_pretrained + head.safetensors + lit_rlhf.json) is a reward
    model, not a fresh sequence classifier: it scores as the adapter it was merged from."""
    bank = AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", path=reward_adapter, trainable=False,
                                                                      head="score")]))
    merged = bank.export_merged(tmp_path / "merged", adapter="reward", keep_head=True,
                                metadata={"normalization": {"mean": 0.25, "std": 2.0}})
    req = request(tokenizer, [True, False, True, True])
    from_adapter, from_merged = ModelReward(reward_adapter), ModelReward(str(merged))
    from_adapter.setup()
    from_merged.setup()
    assert from_merged(req).tolist() == pytest.approx(from_adapter(req).tolist(), abs=1e-5)
    assert from_merged.saved_normalization() == {"mean": 0.25, "std": 2.0}


def test_separate_model_tokenises_a_conversation_as_its_training_rows(tokenizer, reward_adapter):
    """Conversational prompts are rendered with the reward tokenizer's template and tokenised as the
    data pipeline tokenised the reward model's training rows (the template owns the special tokens)."""
    from lit_rlhf.data import SFTCollator, Where, build_examples

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    req = RewardRequest(rendered, COMPLETIONS, make_rollout(tokenizer, PROMPTS, COMPLETIONS), raw_prompts=conversations)
    source = ModelReward(reward_adapter)
    source.setup()
    rows = [(Where("test", i, "row", "python"), {"messages": c + [{"role": "assistant", "content": completion}]})
            for i, (c, completion) in enumerate(zip(conversations, COMPLETIONS), start=1)]
    examples, errors = build_examples("sft", rows, tokenizer, max_length=None)
    assert not errors
    batch = SFTCollator(tokenizer.pad_token_id)(examples)
    bank = AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", path=reward_adapter, trainable=False,
                                                                      head="score")])).eval()
    with torch.no_grad():
        expected = bank.score(batch["input_ids"], batch["attention_mask"], adapter="reward")
    assert source(req).tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_text_past_the_reward_models_positions_is_scored_on_its_end(tmp_path, tokenizer, caplog):
    """A 32-position GPT-2 reward model and a 40-token text (bos, prompt, reply, eos): it failed with an
    IndexError. The text keeps its bos and its last 31 tokens, where the score is read; logged once."""
    import logging

    from lit_rlhf.rollout import RewardScorer
    from tests.rollout._rollout_helpers import gpt2_reward_model

    scorer = RewardScorer.load(gpt2_reward_model(tmp_path / "rm", tokenizer, positions=32))
    long, short = ("the movie was great fun but boring . " * 4 + "the book was", "good great ."), PROMPTS[0]
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.rollout"):
        scores = scorer.scores([long, short, long])
    assert caplog.text.count("longer than the reward model's 32 positions (n_positions=32)") == 1
    ids = tokenizer(" ".join(long))["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) == 40
    with torch.no_grad():
        end = scorer.model(input_ids=torch.tensor([ids[:1] + ids[-31:]])).logits[0, 0]
        whole_short = scorer.model(input_ids=torch.tensor([tokenizer(short)["input_ids"] + [tokenizer.eos_token_id]]))
    torch.testing.assert_close(scores[0], end)
    torch.testing.assert_close(scores[2], end)
    torch.testing.assert_close(scores[1], whole_short.logits[0, 0])
