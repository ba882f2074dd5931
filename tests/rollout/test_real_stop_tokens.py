"""Rollouts of chat models stop at their end-of-turn token, also when it is not the tokenizer's EOS
(Llama-3's first instruct release: EOS ``<|end_of_text|>``, turns end with ``<|eot_id|>``; Gemma:
EOS ``<eos>``, turns end with ``<end_of_turn>``), and the text a reward sees is the response's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_rlhf.data import Where
from lit_rlhf.data.tokenize import build_examples, join_prompt_completion
from lit_rlhf.methods.online import OnlineMethod
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.rollout import HFGenerateEngine, SamplingConfig, truncate_at_stop
from tests.data.real_tokenizers import FAMILIES, build_family

#: family -> the tokens a default rollout stops at: the EOS, and the template's end-of-turn token.
EXPECTED_STOPS = {"gpt2": ["<|endoftext|>"], "llama3": ["<|end_of_text|>", "<|eot_id|>"], "qwen2.5": ["<|im_end|>"],
                  "qwen2.5_base": ["<|endoftext|>", "<|im_end|>"],
                  "gemma2": ["<eos>", "<end_of_turn>"], "mistral": ["</s>"], "llama2": ["</s>"]}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_tokenizers")
    return {name: build_family(name, root) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_stop_tokens_are_eos_and_the_templates_end_of_turn(tokenizers, family):
    tok = tokenizers[family]
    stops = SamplingConfig().resolved(tok).stop_token_ids
    assert tok.convert_ids_to_tokens(stops) == EXPECTED_STOPS[family]
    # An explicit list is the user's: nothing is added to it.
    assert SamplingConfig(stop_token_ids=[5]).resolved(tok).stop_token_ids == [5]


@pytest.mark.parametrize(("family", "after"), [
    ("qwen2.5_base", "<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"),
    ("gemma2", "<end_of_turn>\n<start_of_turn>user\nhello there<end_of_turn>\n"),
    ("llama3", "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|>"),
])
def test_a_chat_response_ends_at_its_turn_end_and_decodes_to_its_content(tokenizers, family, after):
    """The model closes its turn and (unstopped) would go on writing the user's next turn: the
    rollout ends at the turn end, and the reward function gets the reply alone."""
    tok = tokenizers[family]
    sampling = SamplingConfig().resolved(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is the capital of france ?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    response = torch.tensor([tok("paris ." + after, add_special_tokens=False)["input_ids"]])
    rollout = truncate_at_stop(prompt["input_ids"], prompt["attention_mask"], response, sampling.stop_token_ids,
                               sampling.pad_token_id)
    reply = len(tok("paris .", add_special_tokens=False)["input_ids"])
    assert rollout.ended.tolist() == [True] and rollout.response_lengths.tolist() == [reply + 1]
    assert OnlineMethod.decode_responses(SimpleNamespace(tokenizer=tok), rollout) == ["paris ."]


def test_a_chat_model_that_closes_its_turn_stops_generating(tokenizers, tmp_path):
    """End to end through the hf engine: a tiny model that always writes ``<end_of_turn>`` (Gemma's turn
    end, not its EOS) ends every response after one token instead of running to max_new_tokens."""
    tok = tokenizers["gemma2"]
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    turn_end = tok.convert_tokens_to_ids("<end_of_turn>")
    with torch.no_grad():  # final hidden state all ones; tied embeddings: only <end_of_turn> scores
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[turn_end] = 1.0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bank = AdapterBank(BankSpec(model=str(tmp_path), adapters=[AdapterSpec("policy")])).eval()
    prompt = tok.apply_chat_template([[{"role": "user", "content": "hello there"}]] * 2, add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    sampling = SamplingConfig(max_new_tokens=6, do_sample=False).resolved(tok)
    rollout = HFGenerateEngine().generate(bank, "policy", prompt["input_ids"], prompt["attention_mask"], sampling)
    assert rollout.ended.tolist() == [True, True]
    assert rollout.response_lengths.tolist() == [1, 1]
    assert rollout.response_ids[:, 0].tolist() == [turn_end, turn_end]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoded_plain_response_rejoins_to_the_same_tokens(tokenizers, family):
    """A plain-text response decoded for a reward and joined back to its prompt the way the data
    pipeline joins them tokenises to the very ids the policy generated: no space lost or doubled
    (byte-level families decode the leading space, ``▁`` ones drop it and the join restores it)."""
    tok = tokenizers[family]
    where = Where("data.jsonl", 1, "line")
    examples, errors = build_examples("sft", [(where, {"prompt": "hello there", "completion": "how are you ?"})], tok)
    assert not errors
    prompt_ids, response = examples[0]["prompt_ids"], examples[0]["completion_ids"][:-1]  # generated, EOS cut
    text = tok.decode(response, skip_special_tokens=True)
    assert text.strip() == "how are you ?"
    assert tok(join_prompt_completion("hello there", text))["input_ids"] == prompt_ids + response


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "gemma2", "mistral"])
def test_reward_model_rows_are_the_templates_tokens_with_one_bos(tokenizers, family):
    """What a reward model scores for a chat rollout: the messages + reply rendered by its template
    (the ids ``apply_chat_template`` gives, through the turn end), or, when the reward tokenizer has no template, the policy's
    rendered prompt + reply as a pair: one BOS either way, the template's own."""
    from lit_rlhf.rollout import RewardScorer

    tok = tokenizers[family]
    user = [{"role": "user", "content": "what is the capital of france ?"}]
    conversation = user + [{"role": "assistant", "content": "paris ."}]
    scorer = RewardScorer(model=None, tokenizer=tok)
    messages, pair = scorer.encode([conversation, (tok.apply_chat_template(user, tokenize=False,
                                                                            add_generation_prompt=True), "paris .")])
    ids = messages["prompt_ids"] + messages["completion_ids"]
    template = list(tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
    # The template's tokens through the turn end, where the policy's rollouts end too.
    assert ids == template[: len(ids)] and not tok.decode(template[len(ids):]).strip()
    assert ids[-1] in SamplingConfig().resolved(tok).stop_token_ids
    bos = 0 if family.startswith("qwen") else 1
    assert ids.count(tok.bos_token_id) == bos
    assert (pair["prompt_ids"] + pair["completion_ids"]).count(tok.bos_token_id) == bos


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2.5_base"])
def test_pad_equal_to_eos_keeps_the_stop_token_in_the_response(tokenizers, family):
    """Padding with the EOS (these families have no pad of their own, or it is their EOS): the first
    stop token is in the response mask, the padding written after it is not."""
    tok = tokenizers[family]
    sampling = SamplingConfig().resolved(tok)
    assert sampling.pad_token_id == tok.eos_token_id
    reply = tok("how are you ?", add_special_tokens=False)["input_ids"]
    response = torch.tensor([reply + [sampling.stop_token_ids[-1]] + [sampling.pad_token_id] * 3])
    prompt = torch.tensor([tok("hello there")["input_ids"]])
    rollout = truncate_at_stop(prompt, torch.ones_like(prompt), response, sampling.stop_token_ids, sampling.pad_token_id)
    assert rollout.ended.tolist() == [True]
    assert rollout.response_mask.tolist() == [[1] * (len(reply) + 1) + [0] * 3]
