"""The update's own forward serves as the behaviour forward when no optimizer step can come between the
rollout and the update (``OnlineMethod.fuses_behaviour_pass``): one policy forward fewer per rollout,
and the advantages, the loss and its gradients those of the separate no-grad forward."""

import pytest
import torch

from lit_rlhf.methods import GRPO, PPO, RLOO

from tests.methods.online_helpers import first_batch, make_online, perturbed, prompts, trainer

ONE_UPDATE = dict(update_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1)


def model_forwards(method) -> list[bool]:
    """Whether each forward of the bank's model (policy or reference; generation runs the inner model)
    ran with gradient, in order."""
    calls: list[bool] = []
    method.bank.model.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("cls, options, fused", [
    (GRPO, {}, True),
    (RLOO, {}, True),
    (GRPO, dict(update_epochs=2), False),
    (GRPO, dict(num_mini_batches=2), False),
    (RLOO, dict(gradient_accumulation_steps=2), False),
    (GRPO, dict(dropout=True), False),
])
def test_the_behaviour_forward_is_skipped_exactly_when_no_step_comes_between(cls, options, fused):
    options = {**ONE_UPDATE, **options}
    dropout = options.pop("dropout", False)
    method = make_online(cls, max_new_tokens=4, **options)
    method.bank_spec.disable_dropout = not dropout
    method.configure_model()
    assert method.fuses_behaviour_pass() == fused
    method._prompt_sharing = False  # one model call per pass (shared prompts make two: test_prompt_sharing.py)
    method.uses_fused_head()  # the one-off probe of the LM head runs outside the count
    calls = model_forwards(method)
    trainer(rollouts=1).fit(method, datamodule=prompts())
    # RLOO (kl_coef 0.05) runs the reference without gradient; GRPO (beta 0) has none.
    reference = [False] if cls is RLOO else []
    behaviour = [] if fused else [False]
    args = method.update_args
    updates = [True] * (args.update_epochs * args.num_mini_batches * args.gradient_accumulation_steps)
    assert calls == reference + behaviour + updates


def loss_gradients_and_targets(method, batch, *, fused: bool):
    """One rollout (the same samples whatever ``fused``), its targets, and the loss and gradients of the
    only update step over all its rows, with the behaviour forward fused or separate."""
    method.fuses_behaviour_pass = lambda: fused
    method.rollout_count = 0
    params = method.bank.trainable_parameters()
    for p in params:
        p.grad = None
    scored = method.rollout_and_score(batch)
    assert (scored.taken is not None) == fused
    targets = method.compute_advantages(scored)
    rows = torch.randperm(scored.scores.shape[0])  # as mini_batches shuffles them
    step_tokens = method.loss_mask(scored.rollout).sum().float()
    loss, metrics = method.policy_loss(method.select(scored, targets, rows, step_tokens=step_tokens))
    loss.backward()
    return loss.detach(), metrics, targets, [p.grad.clone() for p in params]


@pytest.mark.parametrize("cls, options", [
    (GRPO, dict(beta=0.04, loss_type="dapo")),
    (RLOO, dict(kl_coef=0.1)),  # the KL in the reward: the behaviour log-probs come before the advantages
    (PPO, dict(critic="shared")),  # the old values come from the same pass
    (PPO, dict(critic="adapter")),
])
def test_the_fused_forward_gives_the_separate_forward_s_loss_and_gradients(cls, options):
    torch.manual_seed(0)
    method = perturbed(make_online(cls, **ONE_UPDATE, **options))
    assert method.fuses_behaviour_pass()
    batch = first_batch(method)
    torch.manual_seed(1)
    loss, metrics, targets, grads = loss_gradients_and_targets(method, batch, fused=False)
    torch.manual_seed(1)
    fused_loss, fused_metrics, fused_targets, fused_grads = loss_gradients_and_targets(method, batch, fused=True)

    assert loss.abs() > 1e-4  # a loss that is not zero, so that equal losses mean something
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    for fused_target, target in zip(fused_targets, targets):
        torch.testing.assert_close(fused_target, target, rtol=1e-6, atol=1e-6)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-6, atol=1e-6)
    # The ratio is exactly 1: nothing clipped, no divergence from the behaviour policy.
    assert float(fused_metrics["policy/clipfrac"]) == 0.0
    assert float(fused_metrics["policy/approxkl"]) == 0.0
