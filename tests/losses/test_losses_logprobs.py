import math

import pytest
import torch

from lit_rlhf.losses import entropy_from_logits, sequence_logps, token_logps

from tests.losses._losses_hand import close


def test_token_logps_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    close(out, [[3.0 - lse, -math.log(3.0)]])


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1024])
def test_token_logps_chunked_matches_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float32) * 3
    labels = torch.randint(0, 7, (3, 5), generator=g)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    unchunked = token_logps(logits, labels, chunk_size=10_000)
    chunked = token_logps(logits, labels, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, expected)
    torch.testing.assert_close(chunked, unchunked)


def test_token_logps_gradient_matches_autograd_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    upstream = torch.randn(2, 4, generator=g)
    (token_logps(logits, labels, chunk_size=3) * upstream).sum().backward()
    ref = torch.log_softmax(ref_logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_token_logps_bf16_returns_float32_and_ignores_minus_100():
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([[1, -100, 3]])
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    close(out, [[-math.log(4)] * 3])
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_token_logps_shape_mismatch():
    with pytest.raises(ValueError, match="disagree"):
        token_logps(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


def test_sequence_logps_shifts_and_masks_prompt():
    # vocab 3; position t's logits predict input_ids[t + 1].
    logits = torch.tensor(
        [
            [
                [9.0, -9.0, 0.0],  # predicts input_ids[1] (prompt token): must not count
                [0.0, 0.0, 0.0],  # predicts input_ids[2] = 2 (completion)
                [math.log(1.0), math.log(2.0), math.log(1.0)],  # predicts input_ids[3] = 1 (completion)
                [5.0, 1.0, 2.0],  # predicts nothing
            ]
        ],
        requires_grad=True,
    )
    input_ids = torch.tensor([[0, 1, 2, 1]])
    completion_mask = torch.tensor([[0, 0, 1, 1]])
    out = sequence_logps(logits, input_ids, completion_mask)
    expected = math.log(1 / 3) + math.log(2 / 4)
    close(out.logps, [expected])
    assert out.num_tokens.tolist() == [2]
    out.logps.sum().backward()
    # The prompt position and the last position receive no gradient.
    assert torch.all(logits.grad[0, 0] == 0) and torch.all(logits.grad[0, 3] == 0)
    assert torch.isfinite(logits.grad).all()


def test_sequence_logps_padding_row():
    logits = torch.zeros(2, 4, 5)
    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]])
    completion_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    out = sequence_logps(logits, input_ids, completion_mask)
    close(out.logps, [3 * -math.log(5), -math.log(5)])
    assert out.num_tokens.tolist() == [3, 1]


def test_entropy_by_hand_and_chunked():
    p = [0.25, 0.25, 0.5]
    logits = torch.tensor([[[math.log(x) for x in p], [0.0, 0.0, 0.0]]])
    out = entropy_from_logits(logits)
    close(out, [[-sum(x * math.log(x) for x in p), math.log(3)]])

    g = torch.Generator().manual_seed(2)
    big = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    ref_in = big.detach().clone().requires_grad_(True)
    chunked = entropy_from_logits(big, chunk_size=2)
    logp = torch.log_softmax(ref_in, dim=-1)
    ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(chunked, ref)
    chunked.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(big.grad, ref_in.grad)
