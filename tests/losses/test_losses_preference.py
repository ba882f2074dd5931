import math

import pytest
import torch

from lit_rlhf.losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss

from tests.losses._losses_hand import close, logsig, sig, t


# Two pairs. a = πc - refc, b = πr - refr, h = a - b.
PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -2.0], [-1.5, -3.0], [-2.0, -3.0]
A = [0.5, -1.0]
B = [-1.0, 1.0]
H = [1.5, -2.0]


def _inputs(requires_grad=False):
    return t(PC, requires_grad), t(PR, requires_grad), t(RC), t(RR)


def test_dpo_sigmoid_by_hand():
    beta = 0.1
    out = dpo_loss(*_inputs(), beta=beta)
    close(out.losses, [-logsig(beta * h) for h in H])
    close(out.chosen_rewards, [beta * a for a in A])
    close(out.rejected_rewards, [beta * b for b in B])
    assert not out.chosen_rewards.requires_grad


def test_dpo_sigmoid_label_smoothing():
    """cDPO (Mitchell 2023) where TRL 1.16 ignores ε for sigmoid; ε = 0 is TRL's plain DPO."""
    beta, eps = 0.1, 0.1
    out = dpo_loss(*_inputs(), beta=beta, label_smoothing=eps)
    close(out.losses, [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in H])


def test_dpo_ipo_length_normalised():
    beta = 0.1
    lc, lr = [2.0, 4.0], [5.0, 2.0]
    out = dpo_loss(*_inputs(), beta=beta, loss_type="ipo", chosen_lengths=t(lc), rejected_lengths=t(lr))
    hn = [A[i] / lc[i] - B[i] / lr[i] for i in range(2)]  # 0.45, -0.75
    close(out.losses, [(x - 1 / (2 * beta)) ** 2 for x in hn])
    close(out.chosen_rewards, [beta * A[i] / lc[i] for i in range(2)])
    # Doubling every log-prob and every length leaves IPO unchanged.
    doubled = dpo_loss(
        *(2 * x for x in _inputs()), beta=beta, loss_type="ipo",
        chosen_lengths=2 * t(lc), rejected_lengths=2 * t(lr),
    )
    close(doubled.losses, out.losses)


def test_dpo_ipo_requires_lengths():
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*_inputs(), loss_type="ipo")


def test_dpo_hinge_and_zero_region():
    out = dpo_loss(*_inputs(), beta=0.1, loss_type="hinge")
    close(out.losses, [max(0.0, 1 - 0.1 * h) for h in H])
    pc, pr, rc, rr = _inputs(requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge")
    close(out.losses, [0.0, 3.0])  # βh = 1.5 > 1: past the margin, no loss
    out.losses.sum().backward()
    assert pc.grad[0] == 0 and pr.grad[0] == 0
    assert pc.grad[1] == -1 and pr.grad[1] == 1


def test_dpo_robust_debiased():
    beta, eps = 0.5, 0.2
    out = dpo_loss(*_inputs(), beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps) for h in H]
    close(out.losses, expected)
    plain = dpo_loss(*_inputs(), beta=beta, loss_type="robust")
    close(plain.losses, [-logsig(beta * h) for h in H])


def test_dpo_bco_pair_offset_delta():
    """BCO (Jung et al. 2024, eq. 9): -logσ(βa - δ) - logσ(-(βb - δ)); δ = 0 by default (TRL 1.16),
    the paper's running mean when the caller passes it."""
    beta = 0.1
    plain = dpo_loss(*_inputs(), beta=beta, loss_type="bco_pair")
    close(plain.losses, [-logsig(beta * A[i]) - logsig(-beta * B[i]) for i in range(2)])
    delta = 0.37
    shifted = dpo_loss(*_inputs(), beta=beta, loss_type="bco_pair", bco_delta=delta)
    close(shifted.losses, [-logsig(beta * A[i] - delta) - logsig(-(beta * B[i] - delta)) for i in range(2)])


def test_dpo_sppo_hard():
    beta = 0.1
    out = dpo_loss(*_inputs(), beta=beta, loss_type="sppo_hard")
    close(out.losses, [(A[i] - 5.0) ** 2 + (B[i] + 5.0) ** 2 for i in range(2)])


def test_dpo_nca_pair():
    beta = 0.1
    out = dpo_loss(*_inputs(), beta=beta, loss_type="nca_pair")
    close(
        out.losses,
        [-logsig(beta * A[i]) - 0.5 * logsig(-beta * A[i]) - 0.5 * logsig(-beta * B[i]) for i in range(2)],
    )


def test_dpo_apo_zero_and_down():
    beta = 0.1
    zero = dpo_loss(*_inputs(), beta=beta, loss_type="apo_zero")
    close(zero.losses, [(1 - sig(beta * A[i])) + sig(beta * B[i]) for i in range(2)])
    down = dpo_loss(*_inputs(), beta=beta, loss_type="apo_down")
    close(down.losses, [sig(beta * A[i]) + (1 - sig(beta * (A[i] - B[i]))) for i in range(2)])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradients_finite(loss_type):
    pc, pr, rc, rr = _inputs(requires_grad=True)
    out = dpo_loss(
        pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=0.1,
        chosen_lengths=t([2.0, 3.0]), rejected_lengths=t([4.0, 1.0]), chosen_nll=-pc / t([2.0, 3.0]),
    )
    assert out.losses.shape == (2,)
    out.losses.mean().backward()
    assert torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0
    assert (pr.grad is None) == (loss_type == "sft")  # sft reads only the chosen completion
    assert pr.grad is None or torch.isfinite(pr.grad).all()


def test_dpo_errors():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(*_inputs(), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_inputs(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_inputs(), label_smoothing=-0.1)


def test_simpo_by_hand():
    beta, ratio, eps = 2.0, 0.5, 0.1
    pc, pr, lc, lr = [-6.0, -2.0], [-10.0, -9.0], [3.0, 2.0], [4.0, 3.0]
    gamma = ratio * beta
    h = [beta * (pc[i] / lc[i] - pr[i] / lr[i]) - gamma for i in range(2)]  # [0.0, 3.0]
    out = simpo_loss(t(pc), t(pr), t(lc), t(lr), beta=beta, gamma_beta_ratio=ratio)
    close(out.losses, [math.log(2.0), -logsig(3.0)])
    close(out.losses, [-logsig(x) for x in h])
    close(out.chosen_rewards, [beta * pc[i] / lc[i] for i in range(2)])
    close(out.rejected_rewards, [beta * pr[i] / lr[i] for i in range(2)])
    smoothed = simpo_loss(t(pc), t(pr), t(lc), t(lr), beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    close(smoothed.losses, [-(1 - eps) * logsig(x) - eps * logsig(-x) for x in h])
    # Length normalisation: twice the tokens with twice the log-prob is the same average.
    same = simpo_loss(2 * t(pc), 2 * t(pr), 2 * t(lc), 2 * t(lr), beta=beta, gamma_beta_ratio=ratio)
    close(same.losses, out.losses)


def test_simpo_gradient_finite():
    pc, pr = t([-6.0, -2.0], True), t([-10.0, -9.0], True)
    simpo_loss(pc, pr, t([3.0, 2.0]), t([4.0, 3.0])).losses.mean().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_cpo_by_hand():
    beta, alpha = 0.1, 1.0
    pc, pr, nll = [-1.0], [-3.0], [0.5]
    out = cpo_loss(t(pc), t(pr), t(nll), beta=beta, alpha=alpha)
    close(out.losses, [-logsig(beta * 2.0) + 0.5])
    close(out.chosen_rewards, [-0.1])
    close(out.rejected_rewards, [-0.3])
    hinge = cpo_loss(t(pc), t(pr), t(nll), beta=beta, alpha=2.0, loss_type="hinge")
    close(hinge.losses, [(1 - 0.2) + 2.0 * 0.5])
    smooth = cpo_loss(t(pc), t(pr), t(nll), beta=beta, alpha=0.0, label_smoothing=0.2)
    close(smooth.losses, [-0.8 * logsig(0.2) - 0.2 * logsig(-0.2)])


def test_cpo_ipo_and_simpo_length_normalised():
    pc, pr, nll, lc, lr = [-1.0], [-3.0], [0.5], [2.0], [3.0]
    hn = -1.0 / 2.0 - (-3.0 / 3.0)  # 0.5
    ipo = cpo_loss(t(pc), t(pr), t(nll), beta=0.1, loss_type="ipo", chosen_lengths=t(lc), rejected_lengths=t(lr))
    close(ipo.losses, [(hn - 5.0) ** 2 + 0.5])
    simpo = cpo_loss(
        t(pc), t(pr), t(nll), beta=2.0, alpha=1.0, loss_type="simpo",
        chosen_lengths=t(lc), rejected_lengths=t(lr), simpo_gamma=0.5,
    )
    close(simpo.losses, [-logsig(2.0 * hn - 0.5) + 0.5])
    close(simpo.chosen_rewards, [2.0 * -0.5])
    close(simpo.rejected_rewards, [2.0 * -1.0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_gradients_finite(loss_type):
    pc, pr, nll = t([-1.0, -2.0], True), t([-3.0, -1.0], True), t([0.5, 0.7], True)
    out = cpo_loss(pc, pr, nll, loss_type=loss_type, chosen_lengths=t([2.0, 2.0]), rejected_lengths=t([3.0, 1.0]))
    out.losses.mean().backward()
    for x in (pc, pr, nll):
        assert torch.isfinite(x.grad).all()
    close(nll.grad, [0.5, 0.5])  # α / batch


def test_cpo_errors():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, simpo"):
        cpo_loss(t([-1.0]), t([-2.0]), t([0.1]), loss_type="robust")
    with pytest.raises(ValueError, match="chosen_lengths"):
        cpo_loss(t([-1.0]), t([-2.0]), t([0.1]), loss_type="simpo")


def test_orpo_by_hand():
    """ORPO (Hong et al. 2024, eqs. 4-7): -pc - β logσ(log odds(pc) - log odds(pr)), p = mean log-prob."""
    beta = 0.3
    pc, pr, lc, lr = [-6.0, -1.0], [-10.0, -0.5], [3.0, 4.0], [4.0, 1.0]
    out = orpo_loss(t(pc), t(pr), t(lc), t(lr), beta=beta)
    expected = []
    for i in range(2):
        c, r = pc[i] / lc[i], pr[i] / lr[i]
        odds_c, odds_r = math.exp(c) / (1 - math.exp(c)), math.exp(r) / (1 - math.exp(r))
        expected.append(-c - beta * logsig(math.log(odds_c / odds_r)))
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * pc[i] / lc[i] for i in range(2)])
    close(out.rejected_rewards, [beta * pr[i] / lr[i] for i in range(2)])
    # Near probability 1 (mean log-prob -1e-9) the loss and its gradient stay finite.
    near_one = t([-1e-9], requires_grad=True)
    edge = orpo_loss(near_one, t([-3.0]), t([1.0]), t([2.0]), beta=beta)
    edge.losses.sum().backward()
    assert torch.isfinite(edge.losses).all() and torch.isfinite(near_one.grad).all()


# -- loss types and f-divergences added for TRL 1.16 parity: random inputs, formulas written out --------

def _random_pairs(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(n, generator=g, dtype=torch.float64) * 6 + 0.5) for _ in range(4))
    lc, lr = (torch.randint(1, 9, (n,), generator=g).double() for _ in range(2))
    return pc, pr, rc, rr, lc, lr


def test_dpo_exo_pair_by_hand():
    """EXO (Ji et al. 2024, eq. 16): KL((σ(z), σ(-z)) ‖ (1-ε, ε)), z = βh; ε = 0 means 1e-3."""
    pc, pr, rc, rr, _, _ = _random_pairs()
    beta = 0.7
    for eps_in, eps in ((0.05, 0.05), (0.0, 1e-3)):
        out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="exo_pair", label_smoothing=eps_in)
        expected = []
        for i in range(5):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            expected.append(sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)))
        close(out.losses, expected)


def test_dpo_aot_paired_and_unpaired_by_hand():
    """AOT (Melnyk et al. 2024): cDPO on sorted margins (paired) or sorted log-ratios (unpaired)."""
    pc, pr, rc, rr, _, _ = _random_pairs()
    beta, eps = 0.5, 0.1
    paired = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot", label_smoothing=eps)
    policy = sorted((pc - pr).tolist())
    ref = sorted((rc - rr).tolist())
    smoothed = [-(1 - eps) * logsig(beta * (p - q)) - eps * logsig(-beta * (p - q)) for p, q in zip(policy, ref)]
    close(paired.losses, smoothed)
    unpaired = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot_unpaired", label_smoothing=eps)
    sa, sb = sorted((pc - rc).tolist()), sorted((pr - rr).tolist())
    close(unpaired.losses, [-(1 - eps) * logsig(beta * (x - y)) - eps * logsig(-beta * (x - y)) for x, y in zip(sa, sb)])


def test_dpo_discopop_by_hand():
    """DiscoPOP (Lu et al. 2024, eq. 5): (1 - σ(z/τ)) (-logσ(z)) + σ(z/τ) e^(-z), z = βh."""
    pc, pr, rc, rr, _, _ = _random_pairs()
    beta, tau = 0.4, 0.05
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="discopop", discopop_tau=tau)
    expected = []
    for i in range(5):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        m = sig(z / tau)
        expected.append((1 - m) * -logsig(z) + m * math.exp(-z))
    close(out.losses, expected)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=0.0)


def test_dpo_sigmoid_norm_by_hand():
    pc, pr, rc, rr, lc, lr = _random_pairs()
    beta = 2.0
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid_norm", chosen_lengths=lc, rejected_lengths=lr)
    hn = [((pc[i] - rc[i]) / lc[i] - (pr[i] - rr[i]) / lr[i]).item() for i in range(5)]
    close(out.losses, [-logsig(beta * x) for x in hn])
    close(out.chosen_rewards, [beta * ((pc[i] - rc[i]) / lc[i]).item() for i in range(5)])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm")


def test_dpo_sft_is_the_chosen_nll():
    pc, pr, rc, rr, lc, _ = _random_pairs()
    out = dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_nll=-pc / lc)
    close(out.losses, (-pc / lc).tolist())
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(pc, pr, rc, rr, loss_type="sft")


def _f_prime(u: float, kind: str, alpha: float) -> float:
    """f'(u) of Wang et al. 2023, Table 1, written out."""
    if kind == "reverse_kl":
        return math.log(u)
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return math.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_f_divergences_by_hand(kind, loss_type):
    """f-DPO (Wang et al. 2023): the loss type applied to f'(π/π_ref) in place of the log-ratio."""
    pc, pr, rc, rr, lc, lr = _random_pairs(seed=1)
    beta, alpha = 0.3, 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, f_divergence=kind, f_alpha=alpha,
                   chosen_lengths=lc, rejected_lengths=lr)
    expected = []
    for i in range(5):
        a = _f_prime(math.exp((pc[i] - rc[i]).item()), kind, alpha)
        b = _f_prime(math.exp((pr[i] - rr[i]).item()), kind, alpha)
        if loss_type == "ipo":
            h = a / lc[i].item() - b / lr[i].item()
            expected.append((h - 1 / (2 * beta)) ** 2)
        else:
            h = a - b
            expected.append(-logsig(beta * h) if loss_type == "sigmoid" else max(0.0, 1 - beta * h))
    close(out.losses, expected)


def test_dpo_f_divergence_refused_where_undefined():
    for loss_type in ("bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "aot", "aot_unpaired"):
        with pytest.raises(ValueError, match="undefined for loss_type"):
            dpo_loss(*_inputs(), loss_type=loss_type, f_divergence="forward_kl")
    with pytest.raises(ValueError, match="valid names are reverse_kl"):
        dpo_loss(*_inputs(), f_divergence="chi2")


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_alphapo_reward_shape_by_hand(loss_type):
    """AlphaPO (Gupta et al. 2025): each log-prob ℓ becomes (1 - e^(-aℓ))/a before the CPO loss."""
    beta, a, gamma = 0.5, 0.3, 0.4
    pc, pr, lc, lr, nll = [-6.0, -2.0], [-10.0, -9.0], [3.0, 2.0], [4.0, 3.0], [0.7, 1.1]
    out = cpo_loss(t(pc), t(pr), t(nll), beta=beta, alpha=0.5, loss_type=loss_type, chosen_lengths=t(lc),
                   rejected_lengths=t(lr), simpo_gamma=gamma, alphapo_alpha=a)
    expected = []
    for i in range(2):
        c, r = (pc[i] / lc[i], pr[i] / lr[i]) if loss_type == "simpo" else (pc[i], pr[i])
        rc, rr = (1 - math.exp(-a * c)) / a, (1 - math.exp(-a * r)) / a
        z = beta * (rc - rr) - (gamma if loss_type == "simpo" else 0.0)
        expected.append(-logsig(z) + 0.5 * nll[i])
    close(out.losses, expected)
    plain = cpo_loss(t(pc), t(pr), t(nll), beta=beta, loss_type=loss_type, chosen_lengths=t(lc),
                     rejected_lengths=t(lr), simpo_gamma=gamma, alphapo_alpha=1e-9)
    close(plain.losses, cpo_loss(t(pc), t(pr), t(nll), beta=beta, loss_type=loss_type, chosen_lengths=t(lc),
                                 rejected_lengths=t(lr), simpo_gamma=gamma).losses, atol=1e-6)
