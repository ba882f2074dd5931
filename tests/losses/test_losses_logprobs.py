import math

import pytest
import torch

from lit_rlhf.losses import entropy_from_logits, head_token_logps, sequence_logps, token_logps

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


def unfused_and_fused(rows: int, vocab: int, *, chunk_size: int, bias: bool, train_weight: bool):
    """Log-probs and gradients of the same head and labels, through ``token_logps`` on the head's whole
    logits and through ``head_token_logps``: ``[(logps, grad_hidden, grad_weight, grad_bias), ...]``."""
    g = torch.Generator().manual_seed(rows * 31 + vocab)
    hidden = torch.randn(rows, 8, generator=g)
    weight = torch.randn(vocab, 8, generator=g)
    head_bias = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        b = None if head_bias is None else head_bias.clone().requires_grad_(True)
        if fused:
            logps, _ = head_token_logps(h, w, b, labels, chunk_size=chunk_size)
        else:
            logps = token_logps(torch.nn.functional.linear(h, w, b)[None], labels[None])[0]
        (logps * upstream).sum().backward()
        results.append((logps.detach(), h.grad, w.grad, None if b is None else b.grad))
    return results


@pytest.mark.parametrize(("rows", "chunk_size", "bias", "train_weight"),
                         [(10, 3, False, True), (10, 10, True, True), (7, 4, True, False), (5, 1, False, False)])
def test_head_token_logps_equals_token_logps_of_the_heads_logits(rows, chunk_size, bias, train_weight):
    # Chunks of 3 and 4 do not divide 10 and 7; a frozen weight (LoRA) gets no gradient.
    unfused, fused = unfused_and_fused(rows, 50, chunk_size=chunk_size, bias=bias, train_weight=train_weight)
    for name, ours, theirs in zip(("logps", "hidden grad", "weight grad", "bias grad"), fused, unfused):
        if theirs is None:
            assert ours is None, name
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)
    assert (fused[2] is None) is (not train_weight)


def test_head_token_logps_by_hand_and_statistic():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # logits [1, 0, 0] and [0, 2, 0]
    logps, stats = head_token_logps(hidden, weight, None, torch.tensor([0, 2]), chunk_size=1,
                                    statistic=lambda chunk: chunk.sum(dim=-1))
    close(logps, [1 - math.log(math.e + 2), -math.log(2 + math.e**2)])
    close(stats, [1.0, 2.0])


def test_head_token_logps_bf16_matches_the_bf16_head():
    """With bf16 inputs, each chunk's logits are made in bf16 like the head's: the same log-probs and
    hidden gradient as the unfused bf16 path; the weight gradient, summed over 8 chunks, within bf16
    rounding of the one matmul over every row."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 16, generator=g).bfloat16().requires_grad_(True)
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 40, (64,), generator=g)
    logps, _ = head_token_logps(hidden, weight, None, labels, chunk_size=8)
    logps.sum().backward()
    reference_w = weight.detach().clone().requires_grad_(True)
    reference_h = hidden.detach().clone().requires_grad_(True)
    expected = token_logps(torch.nn.functional.linear(reference_h, reference_w)[None], labels[None])[0]
    expected.sum().backward()
    assert logps.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(hidden.grad, reference_h.grad)
    torch.testing.assert_close(weight.grad, reference_w.grad, atol=1e-2, rtol=1e-2)


def test_head_token_logps_shape_mismatch():
    with pytest.raises(ValueError, match="weight"):
        head_token_logps(torch.zeros(3, 4), torch.zeros(5, 2), None, torch.zeros(3, dtype=torch.long))


def test_head_token_logps_under_autocast_recomputes_the_forwards_bf16_logits():
    """Float32 weights under bf16 autocast (``bf16-mixed``): chunks are made in bf16 as ``F.linear`` makes
    them, in forward and again in backward (which runs outside autocast), so the log-probs and the hidden
    gradient equal the unfused path's bit for bit; the weight gradient, float32-accumulated, is within bf16
    rounding of the unfused one-matmul bf16 gradient."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(32, 16, generator=g) * 2, torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (32,), generator=g)

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                logps, _ = head_token_logps(h, w, None, labels, chunk_size=8)
            else:
                logps = token_logps(torch.nn.functional.linear(h, w)[None], labels[None])[0]
        logps.sum().backward()
        return logps, h.grad, w.grad

    (logps, grad_h, grad_w), (expected, expected_h, expected_w) = run(True), run(False)
    assert torch.equal(logps, expected) and torch.equal(grad_h, expected_h)
    torch.testing.assert_close(grad_w, expected_w, atol=3e-2, rtol=1e-2)
