import math

import pytest
import torch

from lit_rlhf.losses import (
    gae_advantages,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

from _losses_hand import close, t

NAN = float("nan")


def test_masked_mean_ignores_padding():
    x = t([[1.0, 2.0, 3.0], [4.0, NAN, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(masked_mean(x, mask), 10.0 / 4)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_var():
    x = t([[1.0, 2.0, 3.0], [4.0, 50.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    sq = (1.5**2 + 0.5**2 + 0.5**2 + 1.5**2)  # around mean 2.5
    close(masked_var(x, mask), sq / 3)
    close(masked_var(x, mask, unbiased=False), sq / 4)
    close(masked_var(t([[3.0, 9.0]]), torch.tensor([[1, 0]])), 0.0)  # one element: 0, not nan


def test_whiten_with_mask():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    x = t([[1.0, 2.0, 3.0], [4.0, 50.0, -7.0]])
    std = math.sqrt(5.0 / 3 + 1e-8)
    expected = [[(1 - 2.5) / std, (2 - 2.5) / std, (3 - 2.5) / std], [(4 - 2.5) / std, 0.0, 0.0]]
    close(whiten(x, mask), expected)
    other_padding = t([[1.0, 2.0, 3.0], [4.0, -1e6, 3e5]])
    close(whiten(other_padding, mask), expected)
    unshifted = [[v + 2.5 if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(expected, mask.tolist())]
    close(whiten(x, mask, shift_mean=False), unshifted)


def test_kl_penalty_kinds():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    d = [0.5, -1.0]
    close(kl_penalty(logp, ref), d)
    close(kl_penalty(logp, ref, kind="k2"), [0.5 * x * x for x in d])
    close(kl_penalty(logp, ref, kind="k3"), [math.exp(-x) - (-x) - 1 for x in d])
    close(kl_penalty(logp, ref, kind="abs"), [abs(x) for x in d])
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(logp, ref, kind="full")


def test_gae_three_tokens_by_hand_with_padded_row():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)

    # Row 0: the value after the last token is 0.
    a2 = 1.0 + gamma * 0.0 - 0.7
    a1 = (0.0 + gamma * 0.7 - 0.6) + gamma * lam * a2
    a0 = (0.0 + gamma * 0.6 - 0.5) + gamma * lam * a1
    # Row 1: token 2 is padding; its reward 5 and value 9 must not leak.
    b1 = 2.0 + gamma * 0.0 - 1.0
    b0 = (0.0 + gamma * 1.0 - 0.5) + gamma * lam * b1
    close(out.advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(out.returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 0.5, b1 + 1.0, 0.0]])
    assert abs(a0 - 0.21712) < 1e-12


def test_gae_detached():
    values = t([[0.5, 0.6]], True)
    out = gae_advantages(t([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert not out.returns.requires_grad and not out.advantages.requires_grad


# Tokens: (log-ratio, advantage) covering every side of the clip with ε = 0.2.
#   r=1.5, A=+1: unclipped -1.5, clipped -1.2 -> -1.2 (clipped)
#   r=1.5, A=-1: unclipped  1.5, clipped  1.2 ->  1.5
#   r=0.5, A=+1: unclipped -0.5, clipped -0.8 -> -0.5
#   r=0.5, A=-1: unclipped  0.5, clipped  0.8 ->  0.8 (clipped)
#   r=1.1, A=+2: inside the range             -> -2.2
def _ppo_case():
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logratio = [[math.log(1.5), math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.1), 3.0]]
    logprobs = (old + t(logratio)).detach().requires_grad_(True)
    advantages = t([[1.0, -1.0, 1.0], [-1.0, 2.0, 40.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, advantages, mask, logratio


def test_ppo_policy_loss_clipping_both_sides():
    logprobs, old, advantages, mask, logratio = _ppo_case()
    out = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    close(out.loss, (-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5)
    close(out.clipfrac, 2 / 5)
    valid = [logratio[0][0], logratio[0][1], logratio[0][2], logratio[1][0], logratio[1][1]]
    close(out.approxkl, 0.5 * sum(x * x for x in valid) / 5)
    out.loss.backward()
    g = logprobs.grad
    assert torch.isfinite(g).all()
    # The clipped branch carries no gradient; the others carry -A * r / N.
    close(g, [[0.0, 1.5 / 5, -0.5 / 5], [0.0, -2.0 * 1.1 / 5, 0.0]])


def test_ppo_policy_loss_clip_higher():
    logprobs, old, advantages, mask, _ = _ppo_case()
    out = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.6)
    # r=1.5 now within [0.8, 1.6]: first token contributes -1.5 and is not clipped.
    close(out.loss, (-1.5 + 1.5 - 0.5 + 0.8 - 2.2) / 5)
    close(out.clipfrac, 1 / 5)


def test_ppo_policy_loss_sequence_advantages_broadcast():
    logprobs, old, _, mask, _ = _ppo_case()
    per_seq = ppo_policy_loss(logprobs, old, t([1.0, -1.0]), mask)
    per_tok = ppo_policy_loss(logprobs, old, t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]), mask)
    close(per_seq.loss, per_tok.loss)
    close(per_seq.clipfrac, per_tok.clipfrac)


def test_ppo_value_loss_by_hand():
    values = t([[1.0, 2.0, 0.0, 7.0]], True)
    old = t([[0.5, 2.0, 0.5, 0.0]])
    returns = t([[1.5, 1.0, 0.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # tok0: v_clip = 0.7, max(0.25, 0.64); tok1: 1.0 both; tok2: v_clip = 0.3, max(0, 0.09)
    close(out.loss, 0.5 * (0.64 + 1.0 + 0.09) / 3)
    close(out.clipfrac, 2 / 3)
    out.loss.backward()
    assert torch.isfinite(values.grad).all()
    close(values.grad, [[0.0, 0.5 * 2 * (2.0 - 1.0) / 3, 0.0, 0.0]])


def test_rloo_advantages():
    close(rloo_advantages(t([1.0, 3.0, 0.0, 0.5]), 2), [1 - 3, 3 - 1, 0 - 0.5, 0.5 - 0])
    close(rloo_advantages(t([1.0, 2.0, 6.0]), 3), [1 - 4.0, 2 - 3.5, 6 - 1.5])
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="num_prompts"):
        rloo_advantages(t([1.0, 2.0, 3.0]), 2)


def test_group_advantages_with_zero_variance_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.1, 0.1, 0.1])
    out = group_advantages(rewards, 3)
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)  # unbiased: 1.0
    close(out.advantages, [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0])
    assert torch.equal(out.advantages[3:], torch.zeros(3))  # exactly zero, not float noise
    assert out.zero_std.tolist() == [False, True]
    unscaled = group_advantages(rewards, 3, scale_rewards=False)
    assert torch.equal(unscaled.advantages[3:], torch.zeros(3))
    close(unscaled.advantages[:3], [-1.0, 0.0, 1.0])


def test_group_advantages_k1_no_nan():
    out = group_advantages(torch.tensor([1.0, 5.0]), 1)
    assert torch.equal(out.advantages, torch.zeros(2))
    assert out.zero_std.tolist() == [True, True]


def _grpo_case():
    # Ratio 1 everywhere, so each token's surrogate loss is -A.
    logprobs = t([[-1.0, -2.0, -1.5], [-0.5, -7.0, -7.0]], True)
    old = logprobs.detach().clone()
    advantages = t([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return logprobs, old, advantages, mask


def test_grpo_aggregations_by_hand():
    logprobs, old, adv, mask = _grpo_case()
    # Token losses: row 0 [-1, -1, -1], row 1 [2].
    close(grpo_loss(logprobs, old, adv, mask).loss, ((-3.0 / 3) + (2.0 / 1)) / 2)
    close(grpo_loss(logprobs, old, adv, mask, loss_type="bnpo").loss, (-3.0 + 2.0) / 4)
    close(grpo_loss(logprobs, old, adv, mask, loss_type="token").loss, (-3.0 + 2.0) / 4)
    dr = grpo_loss(logprobs, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    close(dr.loss, (-3.0 + 2.0) / (2 * 4))
    close(dr.clipfrac, 0.0)
    close(dr.kl, 0.0)


def test_grpo_kl_term():
    logprobs, old, adv, mask = _grpo_case()
    ref = (logprobs + 0.5).detach()  # ref - logp = 0.5 everywhere
    k3 = math.exp(0.5) - 0.5 - 1
    out = grpo_loss(logprobs, old, adv, mask, beta=0.04, ref_logprobs=ref)
    close(out.loss, ((-3.0 / 3) + (2.0 / 1)) / 2 + 0.04 * k3)
    close(out.kl, k3)
    out.loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    logged_only = grpo_loss(logprobs, old, adv, mask, beta=0.0, ref_logprobs=ref)
    close(logged_only.loss, 0.5)
    close(logged_only.kl, k3)


def test_grpo_clipping_matches_ppo_per_token():
    logprobs, old, advantages, mask, _ = _ppo_case()
    g = grpo_loss(logprobs, old, advantages, mask, loss_type="token", epsilon=0.2, epsilon_high=0.6)
    p = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.6)
    close(g.loss, p.loss)
    close(g.clipfrac, p.clipfrac)
    close(g.loss, (-1.5 + 1.5 - 0.5 + 0.8 - 2.2) / 5)


def test_grpo_errors():
    logprobs, old, adv, mask = _grpo_case()
    with pytest.raises(ValueError, match="grpo, bnpo, token, dr_grpo"):
        grpo_loss(logprobs, old, adv, mask, loss_type="dapo2")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logprobs, old, adv, mask, loss_type="dr_grpo")
