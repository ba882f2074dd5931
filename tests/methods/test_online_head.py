"""The online forwards with the LM head fused into the log-probs (``OnlineMethod.fused_response_logprobs``):
the response log-probs, the entropy metric and the gradients of the logits path, with each distinct prompt run
once or whole rows, at a sampling temperature other than 1, on LoRA and full weights (tied GPT-2 and Qwen2
heads, a head with a bias: Phi-2's own); the logits path where the model changes its logits after the head
(Gemma2's soft-capping, Cohere's logit scale, Granite's division) or the loss differentiates the entropy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_rlhf.losses import entropy_from_logits
from lit_rlhf.methods import GRPO, PPO, RLOO, BestOfN
from lit_rlhf.methods.online import select_rows
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig
from tests.methods.online_helpers import first_batch, make_online, perturbed
from tests.methods.test_prompt_sharing import rollout
from tests.methods.tiny_families import TOL, build_families

REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]
FUSING = ["llama", "qwen2", "gpt2", "phi"]
SCALING = ["gemma2", "cohere", "granite"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), FUSING + SCALING)


def make_grpo(model: str, *, train_mode: str = "lora", head_bias: bool = False, **kwargs) -> GRPO:
    """GRPO sampling at temperature 0.7 whose policy differs from its reference (LoRA B off zero, or full
    weights nudged); ``head_bias`` gives the LM head a random bias (no tiny family has one)."""
    method = GRPO(bank=BankSpec(model=model, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8)), rewards=REWARD,
                  num_samples_per_prompt=3, sampling=SamplingConfig(temperature=0.7), **kwargs)
    method.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        if head_bias:
            model = method.bank.model.get_base_model() if method.bank.is_peft else method.bank.model
            old = model.get_output_embeddings()
            head = nn.Linear(old.in_features, old.out_features, bias=True)
            head.weight.copy_(old.weight)
            head.bias.normal_(0, 1.0)
            head.requires_grad_(old.weight.requires_grad)
            model.set_output_embeddings(head)
        for name, param in method.bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif train_mode == "full" and param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.01)
    return method


def on_each_head_path(method, run) -> dict:
    """``run()`` with the LM head fused and with logits (the check forced each way)."""
    assert method.uses_fused_head()
    results = {}
    try:
        for fused in (True, False):
            method._fused_head = fused
            results[fused] = run()
    finally:
        method._fused_head = None
    return results


def policy_logps_entropy_and_grads(method, r):
    """The policy's response log-probs and entropy, and the gradients of a weighted sum of the log-probs."""
    method.bank.zero_grad(set_to_none=True)
    taken = method.policy_pass(r, with_entropy=True)
    assert (taken.logits is None) is method._fused_head
    out = method.policy_forward(r, with_entropy=True, taken=taken)
    weights = torch.linspace(-1.0, 2.0, out.logprobs.numel()).view_as(out.logprobs)
    (out.logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in method.bank.named_parameters() if p.grad is not None}
    return out.logprobs.detach(), out.entropy.detach(), grads


def assert_same(fused, logits):
    (logps, entropy, grads), (logps_ref, entropy_ref, grads_ref) = fused, logits
    torch.testing.assert_close(logps, logps_ref, **TOL)
    torch.testing.assert_close(entropy, entropy_ref, **TOL)
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("sharing", [True, False], ids=["shared-prompts", "whole-rows"])
@pytest.mark.parametrize(("family", "train_mode", "head_bias"), [
    ("llama", "lora", False), ("qwen2", "lora", False), ("gpt2", "lora", False),
    ("llama", "full", True), ("gpt2", "full", False),  # full: the head's (GPT-2: the tied embeddings') gradient
    ("phi", "full", False),  # Phi-2's LM head has a bias of its own
])
def test_the_fused_head_gives_the_logits_path_s_log_probs_entropy_and_gradients(models, family, train_mode,
                                                                                head_bias, sharing):
    method = make_grpo(models[family], train_mode=train_mode, head_bias=head_bias)
    assert method.shares_prompts()
    method._prompt_sharing = sharing
    r = rollout(method.bank.model.config.vocab_size)
    method.bank.train()
    results = on_each_head_path(method, lambda: policy_logps_entropy_and_grads(method, r))
    assert_same(results[True], results[False])
    assert any("lm_head" in n or "wte" in n for n in results[True][2]) is (train_mode == "full")


@pytest.mark.parametrize("train_mode", ["lora", "full"])  # adapters off, or the frozen copy's own head
def test_the_reference_log_probs_are_the_logits_path_s(models, train_mode):
    method = make_grpo(models["llama"], train_mode=train_mode, beta=0.04)
    r = rollout(method.bank.model.config.vocab_size)
    results = on_each_head_path(method, lambda: method.reference_logprobs(r))
    torch.testing.assert_close(results[True], results[False], **TOL)
    with method.bank.role(method.policy_adapter), torch.no_grad():
        policy = method.fused_response_logprobs(r)[0]
    assert (policy - results[True]).abs().max() > 1e-3  # policy and reference differ: the reference was read


def test_no_vocabulary_wide_tensor_leaves_the_head_on_the_fused_path(models):
    """The LM head hands back its input in every call of the policy's and the reference's forwards: no
    ``(rows, T, vocab)`` logits are made (the logits path makes them: the check fails there)."""
    method = make_grpo(models["llama"], beta=0.04)
    r = rollout(method.bank.model.config.vocab_size)
    assert method.fuses_policy_head()
    widths = []
    method.bank.output_embeddings().register_forward_hook(lambda m, args, out: widths.append(out.shape[-1]))
    method.policy_forward(r, with_entropy=True).logprobs.sum().backward()
    method.reference_logprobs(r)
    assert widths and set(widths) == {method.bank.model.config.hidden_size}


@pytest.mark.parametrize("family", SCALING)
def test_a_model_that_changes_its_logits_after_the_head_keeps_the_logits_path(models, family):
    method = make_grpo(models[family])
    r = rollout(method.bank.model.config.vocab_size)
    assert not method.uses_fused_head() and not method.fuses_policy_head()
    taken = method.policy_pass(r)
    assert taken.logits is not None
    expected = entropy_from_logits(taken.logits) * r.response_mask
    torch.testing.assert_close(method.policy_forward(r, with_entropy=True, taken=taken).entropy, expected)


def test_an_entropy_bonus_keeps_the_logits_path_and_its_gradient(models):
    """``entropy_coef`` differentiates the entropy: the logits stay; a top-entropy mask only reads it: fused."""
    method = make_grpo(models["llama"], entropy_coef=0.01)
    assert method.uses_fused_head() and method.loss_entropy() == "gradient" and not method.fuses_policy_head()
    r = rollout(method.bank.model.config.vocab_size)
    out = method.policy_forward(r, with_entropy=True)
    assert out.entropy.requires_grad
    masked = make_grpo(models["llama"], top_entropy_quantile=0.5)
    assert masked.loss_entropy() == "metric" and masked.fuses_policy_head()
    assert not masked.policy_forward(r, with_entropy=True).entropy.requires_grad


@pytest.mark.parametrize(("cls", "options", "fused"), [
    (GRPO, dict(top_entropy_quantile=0.5), True),
    (RLOO, {}, True),
    (PPO, dict(critic="adapter"), True),
    (PPO, dict(critic="shared"), False),  # the critic reads the trunk of the policy's own forward
])
def test_the_update_s_taken_pass_carries_what_the_loss_reads(cls, options, fused):
    """The fused behaviour pass (one update over every row) holds log-probs and the entropy the loss reads,
    not logits, and the loss runs on it."""
    torch.manual_seed(0)
    method = perturbed(make_online(cls, update_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1,
                                   **options))
    scored = method.rollout_and_score(first_batch(method))
    taken = scored.taken
    assert (taken.logits is None) is fused and (taken.entropy is not None) is fused
    targets = method.compute_advantages(scored)
    batch = method.select(scored, targets, torch.arange(scored.scores.shape[0]),
                          step_tokens=method.loss_mask(scored.rollout).sum().float())
    loss, metrics = method.policy_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    if fused:
        mask = scored.rollout.response_mask
        with torch.no_grad():
            method._fused_head = False  # the logits path's entropy of the same rows
            entropy = method.policy_forward(scored.rollout, with_entropy=True).entropy
        torch.testing.assert_close(taken.entropy * mask, entropy * mask, **TOL)


def test_best_of_n_s_sft_loss_is_the_logits_path_s_at_temperature_1():
    """Best-of-n trains on its samples at temperature 1 (plain SFT), whatever it sampled at: the fused head
    gives the logits path's loss and gradients, and not the tempered log-probs'."""
    torch.manual_seed(0)
    method = perturbed(make_online(BestOfN, sampling=SamplingConfig(max_new_tokens=8, temperature=0.7)))
    scored = method.rollout_and_score(first_batch(method))
    targets = method.compute_advantages(scored)
    rows = targets.is_best.nonzero().squeeze(1)
    batch = method.select(scored.select(rows), select_rows(targets, rows), torch.arange(rows.numel()))

    def loss_and_grads():
        method.bank.zero_grad(set_to_none=True)
        loss, _ = method.policy_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in method.bank.trainable_parameters()]

    results = on_each_head_path(method, loss_and_grads)
    (loss, grads), (expected, expected_grads) = results[True], results[False]
    torch.testing.assert_close(loss, expected, **TOL)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOL)
    with torch.no_grad(), method.bank.role(method.policy_adapter):
        tempered = method.fused_response_logprobs(batch.rollout)[0]
    mask = batch.rollout.response_mask * batch.targets.weight[:, None]
    assert (-(tempered * mask).sum() / mask.sum() - loss).abs() > 1e-3
