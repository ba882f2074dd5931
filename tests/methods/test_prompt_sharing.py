"""Rows that share a prompt run it once (``models.prefix``): the same logits and gradients as whole
rows, on families with different position schemes (rotary Llama and Qwen2, GPT-2's learned absolute
positions, BLOOM's and Falcon-RW's ALiBi from the attention mask), and whole rows where the cache has sliding
windows or gradient checkpointing drops it."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.methods import GRPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.prefix import prompt_groups, shared_prompt_logits
from lit_rlhf.rollout import RewardSpec, Rollout
from tests.methods.online_helpers import perturbed
from tests.methods.tiny_families import TOL, build_families

REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]
SHARING = ["llama", "qwen2", "gpt2", "bloom", "falcon_alibi"]
SLIDING = ["mistral", "gemma2", "gemma3_text"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), SHARING + SLIDING)


def make_grpo(model: str, **bank) -> GRPO:
    """GRPO whose policy adapter is off zero (so the policy differs from the base)."""
    return perturbed(GRPO(bank=BankSpec(model=model, lora=LoraSpec(r=4, alpha=8), **bank), rewards=REWARD,
                          num_samples_per_prompt=3))


def rollout(vocab: int) -> Rollout:
    """Two prompts (one left-padded) sampled three times each, in shuffled row order, with responses of
    different lengths (right padding)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, vocab, (2, 7), generator=g)
    masks = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    order = torch.tensor([0, 1, 1, 0, 0, 1])
    responses = torch.randint(4, vocab, (6, 5), generator=g)
    lengths = torch.tensor([5, 3, 5, 1, 4, 5])
    response_mask = (torch.arange(5)[None] < lengths[:, None]).long()
    return Rollout(prompts[order] * masks[order], masks[order], responses * response_mask, response_mask,
                   torch.zeros(6, dtype=torch.bool))


def predicting(r: Rollout) -> torch.Tensor:
    """Which of the ``T + 1`` kept positions predict a response token: position ``c`` predicts token ``c``
    (the last prompt position the first token; the last response position nothing)."""
    return torch.cat([r.response_mask, torch.zeros_like(r.response_mask[:, :1])], dim=1).bool()


def test_prompt_groups_name_one_row_per_distinct_prompt():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3: pad id 0 attended
    groups = prompt_groups(ids, mask)
    assert sorted(groups.first.tolist()) == [0, 1, 3]
    torch.testing.assert_close(ids[groups.first[groups.of_row]], ids)
    torch.testing.assert_close(mask[groups.first[groups.of_row]], mask)
    assert prompt_groups(ids, mask).shared
    distinct = prompt_groups(ids[:2], mask[:2])
    assert not distinct.shared and sorted(distinct.first.tolist()) == [0, 1]


@pytest.mark.parametrize("family", SHARING)
def test_shared_prompts_give_whole_row_logits_and_gradients(models, family):
    method = make_grpo(models[family])
    assert method.shares_prompts()
    r = rollout(method.bank.model.config.vocab_size)
    keep = predicting(r)

    def logits_and_grads():
        method.bank.zero_grad()
        with method.bank.role(method.policy_adapter):
            logits = method.rollout_logits(r)
        torch.log_softmax(logits.float(), -1)[..., 5][keep].sum().backward()
        return logits[keep], {n: p.grad.clone() for n, p in method.bank.named_parameters() if p.grad is not None}

    shared, shared_grads = logits_and_grads()
    method._prompt_sharing = False
    whole, whole_grads = logits_and_grads()
    torch.testing.assert_close(shared, whole, **TOL)
    assert shared_grads.keys() == whole_grads.keys() and shared_grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, **TOL, msg=name)


def test_reference_log_probs_are_the_same_shared(models):
    method = make_grpo(models["llama"])
    r = rollout(method.bank.model.config.vocab_size)
    shared = method.reference_logprobs(r)
    method._prompt_sharing = False
    torch.testing.assert_close(shared, method.reference_logprobs(r), **TOL)


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_caches_keep_whole_rows(models, family):
    assert not make_grpo(models[family]).shares_prompts()


def test_gradient_checkpointing_keeps_whole_rows_in_every_forward(models, monkeypatch):
    """The update's forward (with gradients) drops the cache; the behaviour and reference forwards (without)
    run whole rows too, so their log-probs round as the update's do (bfloat16: ratio 1 on the first update)."""
    method = make_grpo(models["llama"], gradient_checkpointing=True)
    r = rollout(method.bank.model.config.vocab_size)
    assert method.shares_prompts()
    method.bank.train()
    with pytest.raises(RuntimeError, match="dropped the prompts' KV cache"):
        shared_prompt_logits(method.bank, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                             prompt_groups(r.prompt_ids, r.prompt_mask))
    calls = []
    monkeypatch.setattr("lit_rlhf.methods.online.shared_prompt_logits", lambda *a: calls.append(a))
    with method.bank.role(method.policy_adapter):
        logits = method.rollout_logits(r)
    assert not calls and logits.requires_grad
    with torch.no_grad():
        method.rollout_logits(r)
    assert not calls


def test_rows_without_a_shared_prompt_make_the_same_calls(models):
    """A mini-batch whose prompts happen to be distinct still runs prompt then responses: every rank makes
    the same forward calls, which FSDP and ZeRO-3 need; the logits are still those of whole rows."""
    method = make_grpo(models["llama"])
    r = rollout(method.bank.model.config.vocab_size).select(torch.tensor([0, 1]))
    assert not prompt_groups(r.prompt_ids, r.prompt_mask).shared and method.shares_prompts()
    calls = []
    method.bank.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        shared = method.rollout_logits(r)
        method._prompt_sharing = False
        whole = method.rollout_logits(r)
    assert len(calls) == 3
    torch.testing.assert_close(shared[predicting(r)], whole[predicting(r)], **TOL)
