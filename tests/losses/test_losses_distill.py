import math

import pytest
import torch

from lit_rlhf.losses import generalized_jsd_loss

from tests.losses._losses_hand import close


S = [0.2, 0.3, 0.5]  # student
T = [0.5, 0.25, 0.25]  # teacher


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def jsd(beta, teacher, student):
    m = [beta * ti + (1 - beta) * si for ti, si in zip(teacher, student)]
    return beta * kl(teacher, m) + (1 - beta) * kl(student, m)


def logits(*dists):
    return torch.tensor([[[math.log(p) for p in d] for d in dists]], dtype=torch.float32)


ONE = torch.ones(1, 1)


def test_beta_endpoints_are_the_two_kls():
    close(generalized_jsd_loss(logits(S), logits(T), ONE, beta=0.0), kl(T, S))  # forward
    close(generalized_jsd_loss(logits(S), logits(T), ONE, beta=1.0), kl(S, T))  # reverse


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_generalized_jsd_by_hand(beta):
    close(generalized_jsd_loss(logits(S), logits(T), ONE, beta=beta), jsd(beta, T, S))


def test_half_is_symmetric_jsd():
    a = generalized_jsd_loss(logits(S), logits(T), ONE, beta=0.5)
    b = generalized_jsd_loss(logits(T), logits(S), ONE, beta=0.5)
    close(a, b)
    m = [(s + t) / 2 for s, t in zip(S, T)]
    close(a, 0.5 * kl(S, m) + 0.5 * kl(T, m))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_zero_when_distributions_match(beta):
    close(generalized_jsd_loss(logits(S), logits(S) + 3.0, ONE, beta=beta), 0.0)


def test_masked_positions_and_reductions():
    student = logits(S, [0.9, 0.05, 0.05])
    teacher = logits(T, [0.05, 0.05, 0.9])
    mask = torch.tensor([[1, 0]])
    v = jsd(0.5, T, S)
    close(generalized_jsd_loss(student, teacher, mask), v)
    close(generalized_jsd_loss(student, teacher, mask, reduction="sum"), v)
    close(generalized_jsd_loss(student, teacher, mask, reduction="none"), [[v, 0.0]])
    both = torch.ones(1, 2)
    w = jsd(0.5, [0.05, 0.05, 0.9], [0.9, 0.05, 0.05])
    close(generalized_jsd_loss(student, teacher, both), (v + w) / 2)
    # batchmean divides the sum by the batch size (2 rows here).
    two = torch.cat([student, student])
    close(generalized_jsd_loss(two, torch.cat([teacher, teacher]), torch.ones(2, 2), reduction="batchmean"), v + w)


def test_temperature():
    temp = 2.0

    def soften(p):
        z = [x ** (1 / temp) for x in p]
        return [x / sum(z) for x in z]

    out = generalized_jsd_loss(logits(S), logits(T), ONE, beta=0.0, temperature=temp)
    close(out, kl(soften(T), soften(S)))


def test_chunked_gradients_and_teacher_detached():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    student_ref = student.detach().clone().requires_grad_(True)
    teacher = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a = generalized_jsd_loss(student, teacher, mask, beta=0.3, chunk_size=3)
    b = generalized_jsd_loss(student_ref, teacher, mask, beta=0.3, chunk_size=1024)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad, student_ref.grad)
    assert torch.all(student.grad[0, 3:] == 0)  # masked positions get no gradient
    assert teacher.grad is None


def test_bf16_inputs_give_float32():
    out = generalized_jsd_loss(logits(S).bfloat16(), logits(T).bfloat16(), ONE, reduction="none")
    assert out.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(logits(S), logits(T), ONE, beta=1.5)
    with pytest.raises(ValueError, match="mean, sum, batchmean, none"):
        generalized_jsd_loss(logits(S), logits(T), ONE, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(logits(S), logits(T), ONE, temperature=0.0)
