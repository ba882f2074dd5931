import pytest
import torch

from lit_rlhf.losses import bradley_terry_loss, kto_kl_estimate, kto_loss

from tests.losses._losses_hand import close, logsig, sig, t


def test_bradley_terry_by_hand():
    rc, rr = t([2.0, 0.5], True), t([1.0, 1.5], True)
    out = bradley_terry_loss(rc, rr)
    close(out.losses, [-logsig(1.0), -logsig(-1.0)])
    close(out.margins, [1.0, -1.0])
    out.losses.mean().backward()
    assert torch.isfinite(rc.grad).all()
    close(rc.grad, [-(1 - sig(1.0)) / 2, -(1 - sig(-1.0)) / 2])


def test_bradley_terry_margin_and_center():
    rc, rr = t([2.0, 0.5]), t([1.0, 1.5])
    out = bradley_terry_loss(rc, rr, margin=t([0.5, 0.0]), center_coefficient=0.01)
    expected = [-logsig(1.0 - 0.5) + 0.01 * 3.0**2, -logsig(-1.0) + 0.01 * 2.0**2]
    close(out.losses, expected)
    close(out.margins, [1.0, -1.0])  # raw score difference, not minus the target margin
    # The per-example centring term averages to TRL's c * mean((rc + rr)^2).
    trl_form = (-logsig(0.5) - logsig(-1.0)) / 2 + 0.01 * (9.0 + 4.0) / 2
    close(out.losses.mean(), trl_form)


def test_bradley_terry_accepts_head_shape():
    out = bradley_terry_loss(t([[2.0], [0.5]]), t([[1.0], [1.5]]))
    assert out.losses.shape == (2,)
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        bradley_terry_loss(t([[2.0, 1.0]]), t([[1.0, 1.0]]))


def test_kto_by_hand():
    beta, wd, wu, kl = 0.1, 1.0, 1.33, 0.2
    policy = t([-1.0, -2.0, -3.0], True)
    ref = t([-1.5, -1.0, -3.0])
    labels = torch.tensor([True, False, True])
    out = kto_loss(policy, ref, labels, torch.tensor(kl), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    r = [0.5, -1.0, 0.0]
    expected = [
        wd * (1 - sig(beta * (r[0] - kl))),
        wu * (1 - sig(beta * (kl - r[1]))),
        wd * (1 - sig(beta * (r[2] - kl))),
    ]
    close(out.losses, expected)
    close(out.rewards, [beta * x for x in r])
    close(out.kl, kl)
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()


def test_kto_kl_clamped_and_detached():
    policy, ref, labels = t([-1.0, -2.0]), t([-1.5, -1.0]), torch.tensor([True, False])
    kl = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, labels, kl)
    at_zero = kto_loss(policy, ref, labels, 0.0)
    close(out.losses, at_zero.losses)
    close(out.kl, 0.0)
    assert not out.losses.requires_grad  # no grad through the reference point


def test_kto_kl_estimate():
    close(kto_kl_estimate(t([-1.0, -2.0]), t([-1.5, -2.1])), (0.5 + 0.1) / 2)
    close(kto_kl_estimate(t([-2.0, -2.0]), t([-1.0, -1.5])), 0.0)
    est = kto_kl_estimate(t([-1.0], True), t([-2.0]))
    assert not est.requires_grad


def test_kto_label_shape_error():
    with pytest.raises(ValueError, match="labels"):
        kto_loss(t([-1.0, -2.0]), t([-1.0, -2.0]), torch.tensor([True]), 0.0)


def test_kto_apo_zero_unpaired_by_hand():
    """Unpaired APO-zero (D'Oosterlinck et al. 2024): w_d (1 - σ(βr)) and w_u σ(βr); the KL is ignored."""
    beta, wd, wu = 0.7, 1.3, 0.8
    policy, ref = t([-2.0, -3.0, -1.0, -4.0]), t([-2.5, -2.0, -1.2, -3.0])
    labels = torch.tensor([True, False, True, False])
    out = kto_loss(policy, ref, labels, 5.0, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                   loss_type="apo_zero_unpaired")
    r = [0.5, -1.0, 0.2, -1.0]
    close(out.losses, [wd * (1 - sig(beta * r[0])), wu * sig(beta * r[1]), wd * (1 - sig(beta * r[2])),
                       wu * sig(beta * r[3])])
    close(out.kl, 0.0)
    with pytest.raises(ValueError, match="kto, apo_zero_unpaired"):
        kto_loss(policy, ref, labels, 0.0, loss_type="apo")


def test_bradley_terry_per_row_margin_by_hand():
    rc, rr, m = t([2.0, 0.5, 1.0]), t([1.0, 1.5, 1.0]), t([0.5, 0.0, 2.0])
    out = bradley_terry_loss(rc, rr, margin=m)
    close(out.losses, [-logsig(2.0 - 1.0 - 0.5), -logsig(0.5 - 1.5), -logsig(1.0 - 1.0 - 2.0)])
    close(out.margins, [1.0, -1.0, 0.0])
