"""The rollout engines: left padding, truncation at the first stop token, the active adapter
restored, sampling settings honoured."""

import pytest
import torch

from lit_rlhf.rollout import ENGINES, Rollout, RolloutEngine, SamplingConfig, build_engine, register_engine, truncate_at_stop

PROMPTS = ["the book was", "i think the park is", "my review of the coffee :", "honestly the car felt"]


def encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def test_truncate_at_first_stop_by_hand():
    pad, eos, other_stop = 0, 3, 9
    prompt = torch.tensor([[0, 5], [6, 7], [0, 8]])
    prompt_mask = torch.tensor([[0, 1], [1, 1], [0, 1]])
    response = torch.tensor([
        [11, 3, 12, 3],   # stops at column 1; what follows is discarded
        [11, 12, 13, 14],  # never stops: cut at max_new_tokens
        [9, 3, 3, 12],    # a second stop id counts too
    ])
    r = truncate_at_stop(prompt, prompt_mask, response, [eos, other_stop], pad)
    assert r.response_ids.tolist() == [[11, 3, 0, 0], [11, 12, 13, 14], [9, 0, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert r.ended.tolist() == [True, False, True]
    assert r.response_lengths.tolist() == [2, 4, 1]
    assert r.attention_mask.tolist()[0] == [0, 1, 1, 1, 0, 0]
    assert r.position_ids.tolist()[0] == [0, 0, 1, 2, 2, 2]


def sampling(tokenizer, **kw):
    return SamplingConfig(**kw).resolved(tokenizer)


def test_left_padding_gives_the_responses_of_unpadded_prompts(bank, tokenizer):
    engine = build_engine("hf")
    ids, mask = encode(tokenizer, PROMPTS)
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    batched = engine.generate(bank, "policy", ids, mask, sampling(tokenizer, do_sample=False, max_new_tokens=10))
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode(tokenizer, [prompt])
        alone = engine.generate(bank, "policy", one_ids, one_mask, sampling(tokenizer, do_sample=False, max_new_tokens=10))
        n = int(batched.response_lengths[i])
        assert batched.response_ids[i, :n].tolist() == alone.response_ids[0, : int(alone.response_lengths[0])].tolist()


def test_responses_are_cut_after_the_first_eos_with_the_mask(bank, tokenizer):
    torch.manual_seed(0)
    ids, mask = encode(tokenizer, PROMPTS * 4)
    r = build_engine("hf").generate(bank, "policy", ids, mask, sampling(tokenizer, max_new_tokens=12))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert r.response_ids.shape[1] <= 12
    assert r.ended.any(), "the toy model ends most responses with </s>"
    for row, row_mask, ended in zip(r.response_ids.tolist(), r.response_mask.tolist(), r.ended.tolist()):
        n = sum(row_mask)
        assert row_mask == [1] * n + [0] * (len(row) - n)  # 1 up to the stop token, then 0
        assert eos not in row[: n - 1]  # no stop token before the last one kept
        assert (row[n - 1] == eos) == ended
        assert all(t == pad for t in row[n:])
        if not ended:
            assert n == r.response_ids.shape[1]


@pytest.mark.parametrize("name", ["hf", "hf_static"])
def test_the_engine_restores_the_active_adapter(name, bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    with bank.role("other"):
        build_engine(name).generate(bank, "policy", ids, mask, sampling(tokenizer, max_new_tokens=4))
        assert bank.active == "other"
        build_engine(name).generate(bank, None, ids, mask, sampling(tokenizer, max_new_tokens=4))  # the reference
        assert bank.active == "other"


def test_greedy_is_deterministic_and_sampling_follows_its_seed(bank, tokenizer):
    engine = build_engine("hf")
    ids, mask = encode(tokenizer, PROMPTS * 2)
    greedy = sampling(tokenizer, do_sample=False, max_new_tokens=8)
    torch.manual_seed(1)
    a = engine.generate(bank, "policy", ids, mask, greedy)
    torch.manual_seed(2)
    b = engine.generate(bank, "policy", ids, mask, greedy)
    assert torch.equal(a.response_ids, b.response_ids)
    # top_k=1 sampling is greedy decoding: the sampling settings reach generate.
    torch.manual_seed(3)
    top1 = engine.generate(bank, "policy", ids, mask, sampling(tokenizer, top_k=1, max_new_tokens=8))
    assert torch.equal(top1.response_ids, a.response_ids)
    draws = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        draws.append(engine.generate(bank, "policy", ids, mask, sampling(tokenizer, max_new_tokens=8)).response_ids)
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    short = engine.generate(bank, "policy", ids, mask, sampling(tokenizer, do_sample=False, max_new_tokens=2))
    assert short.response_ids.shape[1] <= 2


def test_stop_token_ids_are_honoured(bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    period = tokenizer.convert_tokens_to_ids(".")
    r = build_engine("hf").generate(
        bank, "policy", ids, mask, sampling(tokenizer, do_sample=False, max_new_tokens=12,
                                            stop_token_ids=[tokenizer.eos_token_id, period])
    )
    for row, n, ended in zip(r.response_ids.tolist(), r.response_lengths.tolist(), r.ended.tolist()):
        assert period not in row[: n - 1]
        if ended:
            assert row[n - 1] in (period, tokenizer.eos_token_id)


def test_static_cache_engine_matches_the_plain_one(bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    greedy = sampling(tokenizer, do_sample=False, max_new_tokens=8)
    plain = build_engine("hf").generate(bank, "policy", ids, mask, greedy)
    static = build_engine("hf_static").generate(bank, "policy", ids, mask, greedy)
    assert torch.equal(plain.response_ids, static.response_ids)


def test_engines_are_registered_by_name():
    assert {"hf", "hf_static"} <= set(ENGINES)
    assert isinstance(build_engine("hf"), RolloutEngine)
    with pytest.raises(KeyError, match="registered engines"):
        build_engine("nope")

    @register_engine("test_echo")
    class Echo:
        def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling):
            return Rollout(prompt_ids, prompt_mask, prompt_ids[:, :1], torch.ones_like(prompt_ids[:, :1]),
                           torch.zeros(len(prompt_ids), dtype=torch.bool))

    try:
        assert isinstance(build_engine("test_echo"), Echo)
        with pytest.raises(ValueError, match="already registered"):
            register_engine("test_echo")(Echo)
    finally:
        ENGINES.pop("test_echo")


def _generations(bank, tokenizer):
    """Greedy and seeded-sampled responses of both engines, as lists of ids."""
    ids, mask = encode(tokenizer, PROMPTS * 2)
    out = {}
    for name in ("hf", "hf_static"):
        engine = build_engine(name)
        out[name, "greedy"] = engine.generate(bank, "policy", ids, mask,
                                              sampling(tokenizer, do_sample=False, max_new_tokens=12)).response_ids
        torch.manual_seed(7)
        out[name, "sampled"] = engine.generate(bank, "policy", ids, mask,
                                               sampling(tokenizer, max_new_tokens=12)).response_ids
    return out


def test_a_models_generation_config_does_not_change_rollouts(tmp_path, tokenizer):
    """A base's generation_config.json (common in instruct models) must not reach the rollouts:
    the recomputed log-probs describe the plain policy, not a repetition-penalised one."""
    import json
    import shutil

    from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec

    from tests.paths import TOY_BASE

    penalised = tmp_path / "base"
    shutil.copytree(TOY_BASE, penalised)
    config = json.loads((penalised / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=1)
    (penalised / "generation_config.json").write_text(json.dumps(config))

    banks = {}
    for label, path in (("plain", TOY_BASE), ("penalised", str(penalised))):
        torch.manual_seed(0)
        banks[label] = AdapterBank(BankSpec(model=path, adapters=[AdapterSpec("policy")])).eval()
    # The file does change transformers' own generate (else this test would prove nothing).
    ids, mask = encode(tokenizer, PROMPTS)
    plain_default, penalised_default = (
        b.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         pad_token_id=tokenizer.pad_token_id)
        for b in banks.values()
    )
    assert not torch.equal(plain_default, penalised_default)

    plain, penalised_out = _generations(banks["plain"], tokenizer), _generations(banks["penalised"], tokenizer)
    for key in plain:
        assert torch.equal(plain[key], penalised_out[key]), key
        if key[1] == "greedy":  # hf_static decodes greedily to hf's tokens (it samples with its own draws)
            assert torch.equal(plain[key], plain["hf", "greedy"]), key
