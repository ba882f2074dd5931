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

from tests.losses._losses_hand import close, t


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


def test_ppo_losses_over_the_tokens_of_the_whole_step_by_hand():
    """With ``num_tokens`` (the optimizer step's tokens), micro-batch losses add up to the step's token mean."""
    logprobs, old, advantages, mask, _ = _ppo_case()
    # Per-token losses (test above): row 0 (3 tokens) -1.2, 1.5, -0.5; row 1 (2 tokens) 0.8, -2.2.
    first = ppo_policy_loss(logprobs[:1], old[:1], advantages[:1], mask[:1], clip_range=0.2, num_tokens=5)
    second = ppo_policy_loss(logprobs[1:], old[1:], advantages[1:], mask[1:], clip_range=0.2, num_tokens=5)
    close(first.loss, (-1.2 + 1.5 - 0.5) / 5)
    close(second.loss, (0.8 - 2.2) / 5)
    close(first.loss + second.loss, ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2).loss)
    # Per-micro-batch means weighted by rows would give 0.5 * (-0.2 / 3) + 0.5 * (-1.4 / 2), not -1.6 / 5.
    close(first.clipfrac, 1 / 3)  # metrics stay this call's own

    values = t([[1.0, 2.0, 0.0, 7.0]], True)
    value = ppo_value_loss(values, t([[0.5, 2.0, 0.5, 0.0]]), t([[1.5, 1.0, 0.0, -3.0]]), torch.tensor([[1, 1, 1, 0]]),
                           clip_range_value=0.2, num_tokens=torch.tensor(6.0))
    close(value.loss, 0.5 * (0.64 + 1.0 + 0.09) / 6)
    value.loss.backward()
    close(values.grad, [[0.0, 0.5 * 2 * (2.0 - 1.0) / 6, 0.0, 0.0]])


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
    with pytest.raises(ValueError, match="grpo, bnpo, token, dapo, dr_grpo, cispo"):
        grpo_loss(logprobs, old, adv, mask, loss_type="dapo2")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logprobs, old, adv, mask, loss_type="dr_grpo")


# -- GRPO / RLOO options for TRL 1.16 parity: random inputs, formulas written out per token -------------

def _random_case(seed=0, rows=3, cols=5):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = logprobs.detach() + (torch.rand(rows, cols, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref = logprobs.detach() + (torch.rand(rows, cols, generator=g, dtype=torch.float64) - 0.5)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])[:rows]
    entropy = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2
    return logprobs, old, ref, advantages, mask, entropy


def _tokens(mask):
    return [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]


def test_grpo_dapo_by_hand():
    logprobs, old, _, adv, mask, _ = _random_case()
    eps = 0.2
    total = 0.0
    for i, j in _tokens(mask):
        r = math.exp(logprobs[i, j].item() - old[i, j].item())
        total += max(-adv[i].item() * r, -adv[i].item() * min(max(r, 1 - eps), 1 + eps))
    close(grpo_loss(logprobs, old, adv, mask, loss_type="dapo", num_tokens=17.0).loss, total / 17.0)
    with pytest.raises(ValueError, match="num_tokens"):
        grpo_loss(logprobs, old, adv, mask, loss_type="dapo")


def test_grpo_sequence_level_ratio_gspo_by_hand():
    logprobs, old, _, adv, mask, _ = _random_case(1)
    eps = 0.2
    per_sequence = []
    for i in range(3):
        tokens = [j for j in range(5) if mask[i, j]]
        s = math.exp(sum(logprobs[i, j].item() - old[i, j].item() for j in tokens) / len(tokens))
        loss_t = max(-adv[i].item() * s, -adv[i].item() * min(max(s, 1 - eps), 1 + eps))
        per_sequence.append(loss_t)  # every token of the sequence has the same loss
    out = grpo_loss(logprobs, old, adv, mask, importance_sampling_level="sequence")
    close(out.loss, sum(per_sequence) / 3)
    with pytest.raises(ValueError, match="token, sequence"):
        grpo_loss(logprobs, old, adv, mask, importance_sampling_level="prompt")


def test_two_sided_clipping_delta_by_hand():
    logprobs = t([[-1.0, -1.0]], True)
    old = t([[-2.0, -1.1]])  # ratios e^1 = 2.72 and e^0.1 = 1.105
    adv = t([-1.0])  # negative advantage: the unclipped branch is the max
    mask = torch.tensor([[1, 1]])
    plain = grpo_loss(logprobs, old, adv, mask, loss_type="bnpo")
    close(plain.loss, (math.e + math.exp(0.1)) / 2)
    capped = grpo_loss(logprobs, old, adv, mask, loss_type="bnpo", delta=1.5)
    close(capped.loss, (1.5 + math.exp(0.1)) / 2)  # the first ratio is capped at δ


def test_cispo_by_hand_and_gradient_through_every_token():
    logprobs, old, _, adv, mask, _ = _random_case(2)
    cap = 1.1
    total = 0.0
    grad = torch.zeros_like(logprobs)
    for i, j in _tokens(mask):
        w = min(math.exp(logprobs[i, j].item() - old[i, j].item()), cap)
        total += -w * adv[i].item() * logprobs[i, j].item()
        grad[i, j] = -w * adv[i].item() / 10.0
    out = grpo_loss(logprobs, old, adv, mask, loss_type="cispo", epsilon_high=cap, num_tokens=10.0)
    close(out.loss, total / 10.0)
    out.loss.backward()
    close(logprobs.grad, grad)
    with pytest.raises(ValueError, match="epsilon_high"):
        grpo_loss(logprobs, old, adv, mask, loss_type="cispo", num_tokens=10.0)


def test_entropy_bonus_and_top_entropy_quantile_by_hand():
    logprobs, old, _, adv, mask, entropy = _random_case(3)
    eps, coef, q = 0.2, 0.05, 0.4
    tokens = _tokens(mask)
    values = sorted(entropy[i, j].item() for i, j in tokens)
    # torch.quantile's linear interpolation at 1 - q, written out.
    pos = (1 - q) * (len(values) - 1)
    lo = int(math.floor(pos))
    threshold = values[lo] + (pos - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])
    kept = [(i, j) for i, j in tokens if entropy[i, j].item() >= threshold]
    total = 0.0
    for i, j in kept:
        r = math.exp(logprobs[i, j].item() - old[i, j].item())
        total += max(-adv[i].item() * r, -adv[i].item() * min(max(r, 1 - eps), 1 + eps))
    bonus = sum(entropy[i, j].item() for i, j in kept) / len(kept)
    out = grpo_loss(logprobs, old, adv, mask, loss_type="bnpo", entropy=entropy, entropy_coef=coef,
                    top_entropy_quantile=q)
    close(out.loss, total / len(tokens) - coef * bonus)
    assert 0 < len(kept) < len(tokens)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_dapo_entropy_bonus_over_micro_batches_is_one_token_mean_of_the_step(loss_type):
    # dapo's micro-batch losses are summed unweighted over the optimizer step; the bonus must add up to the
    # step's token-mean entropy, -c (1 + 2 + 4) / 3, not to one mean per micro-batch, -c (1.5 + 4).
    coef = 0.1
    micro = [(t([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]])), (t([[4.0, 9.0, 9.0]]), torch.tensor([[1, 0, 0]]))]
    total = 0.0
    for entropy, mask in micro:
        logprobs = t([[-1.0, -1.0, -1.0]])
        out = grpo_loss(logprobs, logprobs, t([0.0]), mask, loss_type=loss_type, num_tokens=3.0, entropy=entropy,
                        entropy_coef=coef, epsilon_high=5.0)
        total = total + out.loss
    close(total, -coef * 7.0 / 3.0)


def test_scale_rewards_group_batch_none_and_bool_aliases():
    rewards = t([1.0, 3.0, 0.0, 4.0, 4.0, 4.0])  # k = 3: groups [1, 3, 0] and [4, 4, 4]
    eps = 1e-4
    g_mean, g_std = 4.0 / 3, math.sqrt(((1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (0 - 4 / 3) ** 2) / 2)
    mean_all = sum([1, 3, 0, 4, 4, 4]) / 6
    b_std = math.sqrt(sum((x - mean_all) ** 2 for x in [1, 3, 0, 4, 4, 4]) / 5)
    centred = [1 - g_mean, 3 - g_mean, 0 - g_mean, 0.0, 0.0, 0.0]
    for scale, alias, expected in (
        ("group", True, [c / (g_std + eps) for c in centred[:3]] + [0.0] * 3),
        ("batch", None, [c / (b_std + eps) for c in centred[:3]] + [0.0] * 3),
        ("none", False, centred),
    ):
        close(group_advantages(rewards, 3, scale_rewards=scale).advantages, expected)
        if alias is not None:
            close(group_advantages(rewards, 3, scale_rewards=alias).advantages, expected)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(rewards, 3, scale_rewards="rank")
    # Under DDP a rank holding only the first group divides by the std of every rank's rewards, not its own.
    first = group_advantages(rewards[:3], 3, scale_rewards="batch", batch_std=torch.tensor(b_std, dtype=torch.float64))
    close(first.advantages, [c / (b_std + eps) for c in centred[:3]])


def test_ppo_policy_loss_sequence_level_ratio_by_hand():
    logprobs, old, _, adv, mask, _ = _random_case(4)
    eps, high = 0.2, 0.28
    total, count = 0.0, 0
    for i in range(3):
        tokens = [j for j in range(5) if mask[i, j]]
        s = math.exp(sum(logprobs[i, j].item() - old[i, j].item() for j in tokens) / len(tokens))
        loss_t = max(-adv[i].item() * s, -adv[i].item() * min(max(s, 1 - eps), 1 + high))
        total += loss_t * len(tokens)
        count += len(tokens)
    out = ppo_policy_loss(logprobs, old, adv, mask, clip_range=eps, clip_range_high=high,
                          importance_sampling_level="sequence")
    close(out.loss, total / count)
