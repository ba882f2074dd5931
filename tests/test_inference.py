"""After training: ``generate`` / ``chat`` / ``evaluate`` on real families' conventions (the offline
tokenizers of ``tests/data/real_tokenizers.py`` on tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lit_rlhf import inference
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.rollout import SamplingConfig
from tests.data.real_tokenizers import build_family


def tiny_model(tok, *, always=None, seed=0):
    """A one-layer GPT-2 over ``tok``'s vocabulary; with ``always``, one that writes that token after any prompt
    (final hidden state all ones, tied embeddings zero but for it)."""
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if always is not None:
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)
            model.transformer.wte.weight.zero_()
            model.transformer.wte.weight[always] = 1.0
    return model


def saved_moved_policy(out) -> Path:
    """A toy policy adapter whose LoRA B is off zero (so it differs from the base), saved to ``out``."""
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model="assets/toy/base"), require=[AdapterSpec("policy")])
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return bank.save_adapter("policy", out)


def test_a_reply_stops_at_every_end_token_the_models_generation_config_lists(tmp_path):
    """Qwen2.5-Instruct's generation_config.json lists ``<|im_end|>`` (its tokenizer's EOS) and
    ``<|endoftext|>``: transformers' ``generate`` stops at either, and so do ours (a model that writes
    ``<|endoftext|>`` ran on to max_new_tokens before, its reply counted as truncated)."""
    tok = build_family("qwen2.5", tmp_path / "tokenizers")
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_model(tok, always=end_of_text)
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, end_of_text], pad_token_id=end_of_text)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    policy = inference.load_policy(tmp_path / "model")
    assert end_of_text in SamplingConfig().resolved(tok, policy.bank.model).stop_token_ids
    batch = next(inference.prompt_batches(policy, [[{"role": "user", "content": "hello there"}]]))
    texts, lengths, rollout = inference.sample(policy, batch, SamplingConfig(max_new_tokens=6, do_sample=False),
                                               adapter=None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "model").generate(
        batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"], max_new_tokens=6, do_sample=False)
    assert theirs.shape[1] - batch["prompt_input_ids"].shape[1] == 1
    assert lengths.tolist() == [1] and rollout.ended.tolist() == [True] and texts == [""]


def test_evaluate_compares_a_policy_with_the_adapter_it_was_trained_from(tmp_path):
    """DPO went on from an SFT adapter: its reference, and evaluate's, is that adapter, not the bare
    base. A policy still equal to its SFT start is its reference: KL 0, win rate one half (evaluate
    measured the KL of the whole SFT step to the base before)."""
    from lit_rlhf.evaluate import main as evaluate_main

    sft_bank = AdapterBank(BankSpec(model="assets/toy/base"), require=[AdapterSpec("policy")])
    torch.manual_seed(0)
    with torch.no_grad():  # an SFT step that moved the policy well off the base
        for name, param in sft_bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    sft = sft_bank.save_adapter("policy", tmp_path / "sft")
    dpo_bank = AdapterBank(BankSpec(model="assets/toy/base", adapters=[AdapterSpec("policy", path=str(sft))]),
                           reference_of="policy")
    policy = dpo_bank.save_adapter("policy", tmp_path / "dpo")  # as DPO exports it before its first step

    args = [str(policy), "--samples", "2", "--max_new_tokens", "6"]
    result = evaluate_main(args + ["--out", str(tmp_path / "eval.json")])
    assert result["reference_model"] == str(sft.resolve())
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result["win_rate"] == 0.5 and result["policy"]["reward"] == result["reference"]["reward"]
    # The bare base on request: the SFT adapter moved the policy off it.
    base = evaluate_main(args + ["--out", str(tmp_path / "base.json"), "--reference", "base"])
    assert base["reference_model"] == "base" and base["kl"] > 0.1
    assert json.loads((tmp_path / "eval.json").read_text())["reference_model"] == str(sft.resolve())


@pytest.mark.parametrize(("family", "arch"), [("llama3", "llama"), ("gemma2", "gemma2")])
def test_generate_from_an_adapter_or_its_merged_export_is_transformers_generate(tmp_path, family, arch):
    """Greedy replies to a batch of chats of different lengths (left padding; a multi-turn history) from
    the LoRA adapter and from its merged export are the tokens transformers' own ``generate`` gives on
    the exported directory for each chat alone, its prompt the template's generation prompt."""
    tok = build_family(family, tmp_path / "tokenizers")
    config = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    bank = AdapterBank(BankSpec(model=str(tmp_path / "base")), require=[AdapterSpec("policy")])
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    exports = [bank.save_adapter("policy", tmp_path / "adapter"), bank.export_merged(tmp_path / "merged", adapter="policy")]
    chats = [[{"role": "user", "content": "what is the capital of france ?"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
              {"role": "user", "content": "how are you ?"}]]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    theirs = []
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        theirs.append(merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                      do_sample=False)[0, ids.shape[1]:].tolist())
    for path in exports:
        policy = inference.load_policy(path)
        batch = next(inference.prompt_batches(policy, chats))
        _, lengths, rollout = inference.sample(policy, batch, SamplingConfig(max_new_tokens=8, do_sample=False),
                                               adapter=policy.adapter)
        assert [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths.tolist())] == theirs, path


def test_a_qlora_adapter_is_loaded_onto_its_base_quantized_as_in_training(tmp_path):
    """A QLoRA adapter corrects the 4-bit weights it was trained against: generate/chat/evaluate load
    the base 4-bit as its lit_rlhf.json records (they ran it on the full-precision base before, next-token
    logits off by 0.34 of a 4.0 range on the toy base, other greedy replies, one log warning)."""
    bank = AdapterBank(BankSpec(model="assets/toy/base", train_mode="qlora"), require=[AdapterSpec("policy")]).eval()
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy = inference.load_policy(bank.save_adapter("policy", tmp_path / "adapter"))
    assert policy.bank.spec.effective_quantization == "4bit"
    batch = next(inference.prompt_batches(policy, ["the movie was", "i think the car is"]))
    with torch.no_grad():
        ours = policy.bank(batch["prompt_input_ids"], batch["prompt_attention_mask"]).logits
        trained = bank(batch["prompt_input_ids"], batch["prompt_attention_mask"]).logits
    torch.testing.assert_close(ours, trained)


def test_generate_chat_sends_a_text_prompt_as_a_user_turn(tmp_path):
    """``generate --chat --prompt TEXT`` is the reply to the chat ``[{user: TEXT}]`` through the template
    (a text prompt is plain text otherwise, as a dataset's is: a chat model's reply to something else)."""
    tok = build_family("llama3", tmp_path / "tokenizers")
    tiny_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "how are you ?"}]}) + "\n")
    args = [str(tmp_path / "model"), "--do_sample", "false", "--max_new_tokens", "6"]

    def completion(*extra):
        inference.generate_main(args + ["--out", str(tmp_path / "out.jsonl"), *extra])
        return json.loads((tmp_path / "out.jsonl").read_text())["completion"]

    assert completion("--prompt", "how are you ?", "--chat") == completion("--prompts", str(chat))
    assert completion("--prompt", "how are you ?") != completion("--prompts", str(chat))


def test_evaluate_kl_is_the_log_ratio_summed_over_each_responses_tokens(tmp_path):
    """``sequence_kl`` of a padded batch (prompts of three lengths, one response ended early) is, per row,
    the sum over its response tokens (stop token included, padding not) of log pi - log pi_ref at the
    sampling temperature, as plain peft and transformers compute it on the row alone."""
    from peft import PeftModel

    from lit_rlhf.evaluate import sequence_kl

    adapter = saved_moved_policy(tmp_path / "adapter")
    policy = inference.load_policy(adapter)
    batch = next(inference.prompt_batches(policy, ["the movie was", "i think the car is really", "hi"]))
    torch.manual_seed(1)
    _, lengths, rollout = inference.sample(policy, batch, SamplingConfig(max_new_tokens=8, temperature=0.7))
    assert not rollout.ended.all() and rollout.ended.any() and len(set(batch["prompt_attention_mask"].sum(1).tolist())) == 3

    base = AutoModelForCausalLM.from_pretrained("assets/toy/base")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("assets/toy/base"), adapter)
    expected = []
    for i, n in enumerate(lengths.tolist()):
        prompt, response = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()], rollout.response_ids[i, :n]
        ids = torch.cat([prompt, response])[None]

        def logp(model):
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1] / 0.7
            return logits.log_softmax(-1).gather(1, response[:, None]).sum()

        expected.append(logp(tuned) - logp(base))
    torch.testing.assert_close(sequence_kl(policy, rollout, 0.7), torch.stack(expected), atol=1e-4, rtol=1e-5)


def test_evaluate_with_greedy_replies_reports_a_labelled_log_ratio_not_a_kl(tmp_path, caplog, capsys):
    """``--do_sample false``: greedy replies are no samples of the policy, so the log-ratio on them is no KL
    estimate. It is reported as ``log_ratio_greedy``, at temperature 1 (which greedy decoding ignores), with
    one warning; the result has no ``kl``."""
    import logging

    from lit_rlhf.evaluate import main as evaluate_main, sequence_kl

    adapter = saved_moved_policy(tmp_path / "adapter")
    prompts = ["the movie was", "i think the car is really"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.evaluate"):
        result = evaluate_main([str(adapter), "--prompts", str(tmp_path / "prompts.jsonl"), "--samples", "1",
                                "--do_sample", "false", "--temperature", "0.5", "--max_new_tokens", "8",
                                "--out", str(tmp_path / "eval.json")])
    assert "kl" not in result and "log-ratio, greedy" in capsys.readouterr().out
    assert caplog.text.count("no KL estimate") == 1

    policy = inference.load_policy(adapter)
    greedy = SamplingConfig(do_sample=False, max_new_tokens=8)
    rollout = inference.sample(policy, next(inference.prompt_batches(policy, prompts)), greedy)[2]
    expected = sequence_kl(policy, rollout, 1.0).mean()
    assert abs(float(expected)) > 1e-2  # the policy is off its reference
    assert result["log_ratio_greedy"] == pytest.approx(float(expected), abs=1e-4)
