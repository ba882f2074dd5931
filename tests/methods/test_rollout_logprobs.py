"""The log-probs the online loop recomputes for a sampled rollout (behaviour and reference; left-padded,
prompt-shared, LM head fused where it can be) are those of a plain forward of each row alone, unpadded, at
the sampling temperature, on position schemes and heads of several families (GPT-2's absolute positions,
BLOOM's ALiBi, Phi-2's partial rotary and biased head, Cohere's logit scale); with a tokenizer whose pad token
is its EOS, the first EOS of a response counts and the pad (= EOS) tokens after it do not."""

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

from lit_rlhf.methods.grpo import GRPO
from lit_rlhf.models import BankSpec, LoraSpec, eval_mode
from lit_rlhf.rollout import SamplingConfig
from lit_rlhf.toy.families import build_tiny

from tests.methods.online_helpers import TOY_REWARD
from tests.methods.tiny_families import AFTER_HEAD

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 30


@pytest.fixture(scope="module")
def pad_is_eos_models(tmp_path_factory):
    """Tiny models whose tokenizer pads with its EOS token (GPT-2's convention)."""
    root = tmp_path_factory.mktemp("pad_is_eos")
    models = {}
    for family in ("gpt2", "llama", "bloom", "phi", "cohere"):
        path = build_tiny(family, root / family)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(path)
        models[family] = str(path)
    return models


def plain_logprobs(model, rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` log-probs of each row's response tokens, and the entropies there, from a forward of that row
    alone, no padding."""
    logprobs, entropy = torch.zeros(rollout.response_ids.shape), torch.zeros(rollout.response_ids.shape)
    for i in range(logprobs.shape[0]):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        n = int(rollout.response_mask[i].sum())
        response = rollout.response_ids[i, :n]
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1].float()
        log_p = (logits / temperature).log_softmax(-1)
        logprobs[i, :n] = log_p.gather(-1, response[:, None])[:, 0]
        entropy[i, :n] = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


# entropy_coef > 0 differentiates the entropy: the policy's forward keeps its logits instead of fusing the LM head.
@pytest.mark.parametrize("family, engine, shared, entropy_coef", [("gpt2", "hf", True, 0.0),
                                                                  ("gpt2", "hf_static", False, 0.01),
                                                                  ("llama", "hf", False, 0.0),
                                                                  ("bloom", "hf_static", True, 0.0),
                                                                  ("phi", "hf_static", False, 0.0),
                                                                  ("cohere", "hf", True, 0.0)])
def test_recomputed_log_probs_are_a_plain_forward_of_each_row(pad_is_eos_models, family, engine, shared, entropy_coef):
    pl.seed_everything(0)
    method = GRPO(bank=BankSpec(model=pad_is_eos_models[family], lora=LoraSpec(r=4, alpha=8)), rewards=[TOY_REWARD],
                  engine=engine, beta=0.1, num_samples_per_prompt=2, entropy_coef=entropy_coef,
                  sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE))
    method.configure_model()
    assert method.fuses_policy_head() == (entropy_coef == 0 and family not in AFTER_HEAD)
    assert method.shares_prompts()  # the tiny families run each distinct prompt once: or whole rows, when told to
    if not shared:
        method.shares_prompts = lambda: False
    tokenizer = method.tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in method.bank.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["the movie was good and", "i think", "a"], return_tensors="pt", padding=True)
    batch = {"prompt_input_ids": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"],
             "prompts": ["p0", "p1", "p2"]}
    rollout = method.sample_and_score(batch)[0]

    lengths = rollout.response_mask.sum(1)
    assert rollout.ended.any() and not rollout.ended.all()  # both kinds of row are checked
    for i in range(lengths.numel()):
        n = int(lengths[i])
        row = rollout.response_ids[i]
        if rollout.ended[i]:
            assert row[n - 1] == eos and not (row[: n - 1] == eos).any()  # the first EOS is the last counted token
            assert (row[n:] == eos).all() and not rollout.response_mask[i, n:].any()  # pad = EOS after it, not counted
        else:
            assert n == MAX_NEW_TOKENS and not (row == eos).any()

    with torch.no_grad(), eval_mode(method.bank):
        behaviour = method.policy_forward(rollout, with_entropy=True)
        reference = method.reference_logprobs(rollout)
        with method.bank.role("policy"):
            expected, expected_entropy = plain_logprobs(method.bank.model, rollout, TEMPERATURE)
        with method.bank.reference():
            expected_reference, _ = plain_logprobs(method.bank.model, rollout, TEMPERATURE)
    torch.testing.assert_close(behaviour.logprobs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(behaviour.entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, expected_reference, atol=1e-5, rtol=1e-5)
    assert (expected - expected_reference).abs().max() > 1e-2  # policy and reference differ: both were checked
