"""How the online methods score responses, on tiny models speaking real families' tokenizers
(tests/data/real_tokenizers.py): where a reward adapter on the bank reads its score, what a separate
reward model with another tokenizer and template is given, what a reward function receives, and a
short GRPO run whose rollouts stop at a chat template's end-of-turn token."""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_rlhf.data.tokenize import end_of_turn_ids
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.rollout import RewardRequest, Rewards, RewardScorer, SamplingConfig, truncate_at_stop
from lit_rlhf.rollout.rewards import AdapterReward, ModelReward, RewardSource
from tests.data.real_tokenizers import FAMILIES, build_family

USER = [{"role": "user", "content": "what is the capital of france ?"}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_tokenizers")
    return {name: build_family(name, root) for name in FAMILIES}


def tiny_model(tok, out, *, stop_logits: dict[int, float] | None = None) -> str:
    """A one-layer GPT-2 over ``tok``'s vocabulary saved with it at ``out``. ``stop_logits``: token -> logit
    the final hidden state (about all ones) gives that token, so sampling stops there at a known rate."""
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if stop_logits:
        with torch.no_grad():  # ln_f ~ 1 + small: the hidden state is near all ones, the LoRA still reaches it
            model.transformer.ln_f.weight.normal_(0, 0.05)
            model.transformer.ln_f.bias.fill_(1.0)
            for token, logit in stop_logits.items():
                model.transformer.wte.weight[token] = logit / config.n_embd
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# -- 1. kind: adapter reads the token it was trained to score at --------------------------------


@pytest.mark.parametrize("family", ["gpt2", "qwen2.5_base", "llama3", "gemma2"])
def test_reward_adapter_reads_the_stop_token_or_the_last_token(tokenizers, tmp_path, family):
    """Left-padded prompts of different lengths, an ended response right-padded after its stop token
    (the pad is the EOS for gpt2, qwen2.5_base and llama3) and a truncated one: the score of each row is
    the reward head at its stop token (ended) or its last token (truncated), as on the row alone."""
    tok = tokenizers[family]
    bank = AdapterBank(BankSpec(model=tiny_model(tok, tmp_path), adapters=[AdapterSpec("reward", head="score")])).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name or "heads" in name:
                p.normal_(0, 0.5)
    sampling = SamplingConfig().resolved(tok)
    stop = sampling.stop_token_ids[-1]  # the turn end where the template has one, else the EOS
    prompts = [tok(p)["input_ids"] for p in ("hello there , how are you today ?", "the movie")]
    replies = [tok(r, add_special_tokens=False)["input_ids"]
               for r in (" i am fine .", " was great fun and the actors were good , the dog slept")]
    width = len(replies[1])  # the truncated row fills max_new_tokens
    assert len(replies[0]) + 1 < width  # the ended row has padding after its stop token
    responses = torch.full((2, width), sampling.pad_token_id)
    responses[0, : len(replies[0]) + 1] = torch.tensor(replies[0] + [stop])
    responses[1] = torch.tensor(replies[1])
    prompt_ids = torch.full((2, max(map(len, prompts))), sampling.pad_token_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, p in enumerate(prompts):
        prompt_ids[i, prompt_ids.shape[1] - len(p):] = torch.tensor(p)
        prompt_mask[i, prompt_ids.shape[1] - len(p):] = 1
    rollout = truncate_at_stop(prompt_ids, prompt_mask, responses, sampling.stop_token_ids, sampling.pad_token_id)
    assert rollout.ended.tolist() == [True, False]
    source = AdapterReward("reward")
    source.setup(bank, tok)
    got = source(RewardRequest(["", ""], ["", ""], rollout))
    alone = [torch.tensor([prompts[0] + replies[0] + [stop]]), torch.tensor([prompts[1] + replies[1]])]
    want = torch.cat([bank.score(ids, torch.ones_like(ids), adapter="reward") for ids in alone])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[0], want[1])  # the head reads something that differs between rows


# -- 2. kind: model with another tokenizer and template -------------------------------------------


def model_reward(tok) -> ModelReward:
    source = ModelReward("reward_model")
    source.scorer = RewardScorer(model=None, tokenizer=tok)
    return source


@pytest.mark.parametrize("reward_family", ["llama3", "gemma2", "qwen2.5", "mistral", "llama2"])
def test_a_cut_off_chat_reply_is_scored_open(tokenizers, reward_family):
    """A policy (ChatML) reply cut at max_new_tokens, re-rendered by the reward model's own template,
    ends at its last content token: the template's turn end (or EOS) is not added, so the reward model
    does not score an unfinished answer as a finished one (a reward adapter on the bank reads the last
    token of a truncated row too). An ended reply keeps it. Failed before: the cut-off reply was closed."""
    policy, tok = tokenizers["qwen2.5"], tokenizers[reward_family]
    prompt = policy.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    request = RewardRequest([prompt] * 2, ["paris is the capital of"] * 2,
                            SimpleNamespace(ended=torch.tensor([True, False])), [USER] * 2)
    source = model_reward(tok)
    closed, cut = source.scorer.encode(source.texts(request), ended=request.rollout.ended.tolist())
    assert closed["prompt_ids"] == cut["prompt_ids"] and closed["prompt_ids"].count(tok.bos_token_id) <= 1
    close = set(end_of_turn_ids(tok)) | {tok.eos_token_id}
    assert closed["completion_ids"][-1] in close
    assert cut["completion_ids"][-1] not in close
    assert closed["completion_ids"][: len(cut["completion_ids"])] == cut["completion_ids"]
    assert tok.decode(cut["completion_ids"]).strip() == "paris is the capital of"
    assert tok.decode(cut["completion_ids"][-1:]).strip()  # no whitespace the template put before its close


@pytest.mark.parametrize("reward_family", ["llama3", "gemma2", "mistral"])
def test_chat_and_plain_rows_use_the_reward_template_once(tokenizers, reward_family):
    """ChatML policy, another reward family: a conversational row is the reward template's own rendering
    (its BOS once, none of the policy's ChatML tags); a plain row is prompt + reply with the reward
    tokenizer's BOS once and its EOS when the reply ended, none when it was cut."""
    policy, tok = tokenizers["qwen2.5"], tokenizers[reward_family]
    chat_prompt = policy.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    plain = "Question : what is two plus two ? Answer :"
    request = RewardRequest([chat_prompt, plain, plain], ["paris .", " four and", " four and"],
                            SimpleNamespace(ended=torch.tensor([True, True, False])), [USER, plain, plain])
    source = model_reward(tok)
    chat, ended, cut = source.scorer.encode(source.texts(request), ended=[True, True, False])
    chat_ids = chat["prompt_ids"] + chat["completion_ids"]
    template = list(tok.apply_chat_template(USER + [{"role": "assistant", "content": "paris ."}], tokenize=True,
                                            return_dict=False))
    assert chat_ids == template[: len(chat_ids)] and not tok.decode(template[len(chat_ids):]).strip()
    assert "<|im_start|>" not in tok.decode(chat_ids) and "You are Qwen" not in tok.decode(chat_ids)
    for row in (chat, ended, cut):
        assert (row["prompt_ids"] + row["completion_ids"]).count(tok.bos_token_id) == 1
    assert ended["completion_ids"][-1] == tok.eos_token_id
    assert cut["completion_ids"] == ended["completion_ids"][:-1]


# -- 4. the missing-EOS rule: cut-off rows only -----------------------------------------------------


@pytest.mark.parametrize("family", ["llama3", "gemma2", "qwen2.5_base"])
def test_missing_eos_penalty_spares_rows_ended_by_the_turn_end(tokenizers, family):
    """A reply ended by the template's turn end (not the tokenizer's EOS) is not truncated: the penalty
    (and the replacing score) hit only the row that ran to max_new_tokens; weights and clipping first."""
    tok = tokenizers[family]
    sampling = SamplingConfig(max_new_tokens=4).resolved(tok)
    eos, turn_end = sampling.stop_token_ids
    assert eos == tok.eos_token_id and turn_end != eos
    word = tok(" fine", add_special_tokens=False)["input_ids"][:1]
    responses = torch.tensor([word + [turn_end] + [sampling.pad_token_id] * 2, word + [eos] + word * 2, word * 4])
    prompt = torch.tensor([tok("hello there")["input_ids"]] * 3)
    rollout = truncate_at_stop(prompt, torch.ones_like(prompt), responses, sampling.stop_token_ids,
                               sampling.pad_token_id)
    assert rollout.ended.tolist() == [True, True, False]

    class Constant(RewardSource):  # one fixed score per row
        def __init__(self, values):
            self.name, self.label, self.values = f"c{values[0]}", "constant", values

        def __call__(self, request):
            return torch.tensor(self.values)

    request = RewardRequest(["hello there"] * 3, ["fine"] * 3, rollout)
    penalised = Rewards([Constant([1.0, 2.0, 3.0]), Constant([0.5, 0.5, 0.5])], clip=3.0, missing_eos_penalty=1.0)
    assert penalised(request).scores.tolist() == [1.5, 2.5, 2.0]  # clip(3.5) = 3.0, then -1 on the cut-off row
    replaced = Rewards([Constant([1.0, 2.0, 3.0])], missing_eos_score=-7.0)
    assert replaced(request).scores.tolist() == [1.0, 2.0, -7.0]


# -- 5. a short GRPO run on a chat tokenizer whose turn end is not its EOS ---------------------------

SEEN: list[tuple[list, list]] = []


def recording_reward(prompts, completions):
    """Records what a reward function receives; rewards longer replies."""
    SEEN.append((list(prompts), list(completions)))
    return [float(len(c.split())) for c in completions]


def hashed_reward(prompts, completions):
    """Records what it receives; a score fixed by the reply's text, unrelated to whether it ended."""
    SEEN.append((list(prompts), list(completions)))
    return [float(zlib.crc32(c.encode()) % 1000) for c in completions]


def saved_reward_adapter(model: str, out) -> str:
    """A reward adapter (LoRA + score head moved off their initial values) of ``model``, saved at ``out``."""
    torch.manual_seed(2)
    bank = AdapterBank(BankSpec(model=model), require=[AdapterSpec("reward", head="score")])
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name or "heads" in name:
                p.normal_(0, 0.5)
    bank.save_adapter("reward", out)
    return str(out)


@pytest.mark.parametrize(("family", "engine"), [("llama3", "hf"), ("qwen2.5_base", "hf"), ("llama3", "hf_static"),
                                                 ("qwen2.5_base", "hf_static"), ("gemma2", "hf_static")])
def test_grpo_rollouts_stop_at_the_turn_end_and_the_rewards_read_the_reply(tokenizers, tmp_path, family, engine):
    """Two GRPO rollouts of conversational prompts on a tiny model that writes the template's turn end
    (not the EOS; qwen2.5_base pads with its EOS) about one token in five, rewarded by a function plus
    0.5 x a reward adapter on the bank: responses end at the turn end and are ``ended``, the mask covers
    the reply through its stop token only, the function gets the chat-rendered prompt (the template's
    text, generation prompt included) and the reply's text without the stop token, the adapter scores
    each row as it scores the row alone (prompt + reply through its stop token), the reward is their
    weighted sum, and the policy moves."""
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.methods import GRPO
    from lit_rlhf.rollout import RewardSpec
    from tests.methods.online_helpers import trainer

    tok = tokenizers[family]
    turn_end = end_of_turn_ids(tok)[0]
    assert turn_end != tok.eos_token_id
    model = tiny_model(tok, tmp_path / "model", stop_logits={turn_end: 5.0})
    reward_adapter = saved_reward_adapter(model, tmp_path / "reward")
    data = tmp_path / "prompts.jsonl"
    rows = [[{"role": "user", "content": c}] for c in ("hello there", "what is two plus two ?", "say hi", "the sea")]
    data.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    bank = BankSpec(model=model, adapters=[AdapterSpec("reward", path=reward_adapter, head="score", trainable=False)])
    method = GRPO(bank=bank, rewards=[RewardSpec("function", function=f"{__name__}:recording_reward"),
                                      RewardSpec("adapter", adapter="reward", weight=0.5)],
                  num_samples_per_prompt=4, learning_rate=1e-2, sampling=SamplingConfig(max_new_tokens=6),
                  log_samples_every_n_rollouts=0, engine=engine)
    calls = []
    score = method.score_responses

    def recorded(rollout, prompts, raw_prompts, **kwargs):
        completions, out = score(rollout, prompts, raw_prompts, **kwargs)
        calls.append((rollout, completions, out))
        return completions, out

    method.score_responses = recorded
    SEEN.clear()
    method.configure_model()
    before = {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}
    trainer(rollouts=2, root=tmp_path).fit(method, datamodule=PromptDataModule(train=str(data), batch_size=2,
                                                                                max_length=96))
    assert len(calls) == len(SEEN) == 2
    rendered = {tok.apply_chat_template(r, tokenize=False, add_generation_prompt=True) for r in rows}
    ended_by_turn_end = 0
    method.bank.eval()
    for (rollout, completions, out), (prompts, seen) in zip(calls, SEEN):
        assert set(prompts) <= rendered and seen == completions
        torch.testing.assert_close(out.scores, out.per_source["recording_reward"] + 0.5 * out.per_source["reward"])
        for row, (ids, mask, ended, text) in enumerate(zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                                           rollout.ended.tolist(), completions)):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n)
            stops = [i for i, t in enumerate(ids[:n]) if t in (turn_end, tok.eos_token_id)]
            assert ended == bool(stops) and stops in ([], [n - 1])
            assert ids[n:] == [tok.pad_token_id] * (len(ids) - n)
            assert text == tok.decode(ids[: n - ended], skip_special_tokens=True)
            ended_by_turn_end += ended and ids[n - 1] == turn_end
            alone = torch.tensor([rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() + ids[:n]])
            with torch.no_grad():
                want = method.bank.score(alone, torch.ones_like(alone), adapter="reward")
            torch.testing.assert_close(out.per_source["reward"][row:row + 1], want, atol=1e-5, rtol=1e-5)
    assert 0 < ended_by_turn_end < 16  # some rows stop at the turn end, some run to max_new_tokens
    moved = [n for n, p in method.bank.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and not any(".reward." in n for n in moved)


def test_a_reply_spelling_the_reward_templates_tags_is_warned_about(tokenizers, caplog):
    """A ChatML policy can spell Llama-3's ``<|eot_id|>`` with ordinary tokens; re-tokenised for a Llama-3
    reward model it becomes the real turn end (and a fake next turn): warned about, once."""
    policy, tok = tokenizers["qwen2.5"], tokenizers["llama3"]
    spelled = policy("paris .<|eot_id|><|start_header_id|>user", add_special_tokens=False)["input_ids"]
    text = policy.decode(spelled, skip_special_tokens=True)
    assert "<|eot_id|>" not in policy.convert_ids_to_tokens(spelled)  # plain characters on the policy's side
    assert tok.convert_tokens_to_ids("<|eot_id|>") in tok(text, add_special_tokens=False)["input_ids"]
    request = RewardRequest(["hi"] * 2, [text, "paris ."], SimpleNamespace(ended=torch.tensor([True, True])), None)
    source = model_reward(tok)
    with caplog.at_level("WARNING", logger="lit_rlhf.rollout"):
        source.texts(request)
        source.texts(request)
    warned = [r for r in caplog.records if "as text" in r.getMessage()]
    assert len(warned) == 1 and "<|eot_id|>, <|start_header_id|>" in warned[0].getMessage()


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_a_reward_function_gets_a_plain_prompt_as_written(tokenizers, tmp_path, family):
    """Plain prompts: the function gets each dataset prompt as written (no BOS text, once per sample)
    and the reply decoded from the rollout without its stop token."""
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.methods import GRPO
    from lit_rlhf.rollout import RewardSpec

    tok = tokenizers[family]
    model = tiny_model(tok, tmp_path / "model", stop_logits={tok.eos_token_id: 5.5})
    data = tmp_path / "prompts.jsonl"
    rows = ["hello there , how are you today ?", "Question : what is two plus two ? Answer :"]
    data.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    method = GRPO(bank=BankSpec(model=model, adapters=[]), rewards=[RewardSpec(
        "function", function=f"{__name__}:recording_reward")], num_samples_per_prompt=2,
        sampling=SamplingConfig(max_new_tokens=6), log_samples_every_n_rollouts=0)
    method.configure_model()
    batch = next(iter(PromptDataModule(train=str(data), batch_size=2).prepare(method.tokenizer).train_dataloader()))
    SEEN.clear()
    scored = method.rollout_and_score(batch)
    (prompts, completions), = SEEN
    assert prompts == [rows[0], rows[0], rows[1], rows[1]]
    rollout = scored.rollout
    lengths = (rollout.response_lengths - rollout.ended.long()).tolist()
    assert completions == [tok.decode(ids[:n], skip_special_tokens=True)
                           for ids, n in zip(rollout.response_ids.tolist(), lengths)]


def test_a_sequence_classifier_is_padded_with_its_own_pad_id(tokenizers, tmp_path):
    """A transformers reward model reads its score at the last token that is not ``config.pad_token_id``.
    Llama-3's tokenizer gets EOS as pad (it has none), while the model's config names another pad id:
    padded with the tokenizer's pad, a shorter row was read on its padding. Each row of a batch now scores
    as it does alone. Failed before (the short row's score moved)."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizers["llama3"]
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, num_labels=1,
                                  pad_token_id=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert tok.pad_token_id != config.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 10.0)  # scores far apart wherever they are read
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = RewardScorer.load(tmp_path)
    texts = [("hello there", "how are you ?"), ("hello there", "i am fine , thank you . the movie was great fun")]
    alone = torch.cat([scorer.scores([text]) for text in texts])
    torch.testing.assert_close(scorer.scores(texts), alone, atol=1e-5, rtol=1e-5)


def test_best_of_n_data_leaves_out_responses_cut_at_max_new_tokens(tokenizers, tmp_path):
    """Best-of-n data closes every completion with EOS when trained on, so a best (or worst) response cut
    at max_new_tokens would teach stopping wherever the cut fell: such prompts give no row. The reward here
    ignores whether a reply ended. Failed before (cut replies written)."""
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.methods import BestOfN
    from lit_rlhf.methods.best_of_n import generate_best_of_n
    from lit_rlhf.rollout import RewardSpec

    tok = tokenizers["gpt2"]
    model = tiny_model(tok, tmp_path / "model", stop_logits={tok.eos_token_id: 5.5})
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"prompt {i} :"}) + "\n" for i in range(16)))
    method = BestOfN(bank=BankSpec(model=model, adapters=[]), rewards=[RewardSpec(
        "function", function=f"{__name__}:hashed_reward")], num_samples_per_prompt=4,
        sampling=SamplingConfig(max_new_tokens=4), log_samples_every_n_rollouts=0)
    rollouts = []
    generate = method.generate_rollout
    method.generate_rollout = lambda *a: rollouts.append(generate(*a)) or rollouts[-1]
    torch.manual_seed(0)
    method.configure_model()
    batches = PromptDataModule(train=str(data), batch_size=16).prepare(method.tokenizer).train_dataloader()
    SEEN.clear()
    for format, ended_side in (("sft", ("completion",)), ("preference", ("chosen", "rejected"))):
        rows = generate_best_of_n(method, batches, format=format)
        (_, completions), rollout = SEEN[-1], rollouts[-1]
        ended = {}
        for text, done in zip(completions, rollout.ended.tolist()):
            ended.setdefault(text, set()).add(done)
        assert rows and not rollout.ended.all()  # cut replies were there to leave out
        for row in rows:
            assert all(True in ended[row[side]] for side in ended_side)


def test_a_reward_adapter_on_another_family_scores_the_rows_its_template_makes(tokenizers, tmp_path):
    """``kind: model``: a saved reward adapter on a Llama-3-tokenizer base scores a ChatML policy's rollout
    rows (one ended, one cut off, batched: right padding with Llama-3's pad == EOS) exactly as it scores
    each conversation alone, rendered by its own template: BOS once, through ``<|eot_id|>`` when ended,
    open when cut."""
    policy, tok = tokenizers["qwen2.5"], tokenizers["llama3"]
    model = tiny_model(tok, tmp_path / "model")
    source = ModelReward(saved_reward_adapter(model, tmp_path / "reward"))
    source.setup()
    prompt = policy.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    replies = ["paris .", "the capital of france is paris and the"]
    request = RewardRequest([prompt] * 2, replies, SimpleNamespace(ended=torch.tensor([True, False]),
                                                                   response_ids=torch.zeros(2, 1)), [USER] * 2)
    got = source(request)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    want = []
    for reply, ended in zip(replies, (True, False)):
        ids = list(tok.apply_chat_template(USER + [{"role": "assistant", "content": reply}], tokenize=True,
                                           return_dict=False))
        ids = ids[: ids.index(eot, len(ids) - 1) + (1 if ended else 0)]
        assert ids.count(tok.bos_token_id) == 1
        row = torch.tensor([ids])
        want.append(source.scorer.model.score(row, torch.ones_like(row), adapter="reward"))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
