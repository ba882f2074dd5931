"""The load-balancing loss of mixtures of experts against hand-computed values and transformers' own."""

from __future__ import annotations

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lit_rlhf.losses import load_balancing_loss


def test_load_balancing_loss_on_hand_computed_routing():
    # One layer, two experts, top-1. Router probabilities (0.2, 0.8), (0.25, 0.75), (0.75, 0.25): experts 1, 1, 0,
    # so f = (1/3, 2/3) and P = (0.4, 0.6); loss = 2 * (1/3 * 0.4 + 2/3 * 0.6) = 16/15. The fourth (masked)
    # token would route to expert 0 with probability 0.9.
    logits = torch.log(torch.tensor([[0.2, 0.8], [0.25, 0.75], [0.75, 0.25], [0.9, 0.1]]))
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(load_balancing_loss([logits], 1, mask), torch.tensor(16 / 15))
    # Unmasked: f = (1/2, 1/2), P = (0.525, 0.475): 2 * 0.5 * 1 = 1.
    torch.testing.assert_close(load_balancing_loss([logits], 1), torch.tensor(1.0))
    # Two layers are pooled, not averaged per layer: the same layer twice gives the same loss.
    torch.testing.assert_close(load_balancing_loss([logits, logits], 1, mask), torch.tensor(16 / 15))
    # Balanced routing gives top_k: each token sure of its own expert, f = P = (1/3, 1/3, 1/3).
    sure = torch.eye(3) * 30.0
    torch.testing.assert_close(load_balancing_loss([sure], 1), torch.tensor(1.0))


def test_load_balancing_loss_is_transformers_on_a_padded_batch():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layers = tuple(torch.randn(10, 4) for _ in range(3))
    expected = load_balancing_loss_func(layers, 4, 2, mask)
    torch.testing.assert_close(load_balancing_loss(layers, 2, mask), expected)
    # And the same tokens in another layout (a padding-free row) give the same loss.
    real = mask.reshape(-1).bool()
    packed = tuple(layer[real] for layer in layers)
    torch.testing.assert_close(load_balancing_loss(packed, 2), expected)
