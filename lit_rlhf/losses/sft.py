"""The supervised (causal language modelling) loss: negative log-likelihood of completion tokens."""

from __future__ import annotations

import torch

from lit_rlhf.losses.logprobs import sequence_logps

__all__ = ["completion_nll"]


def completion_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the completion tokens of a batch, and how many tokens it sums.

    ``nll_sum = -Σ_b Σ_t m[b, t] · log p(x[b, t] | x[b, <t])``, ``num_tokens = Σ m``; the caller
    divides (SFT over the tokens of every data-parallel rank, best-of-n per micro-batch).

    Args:
        logits: ``(batch, seq, vocab)`` of a causal LM run on ``input_ids``.
        input_ids: ``(batch, seq)``.
        completion_mask: ``(batch, seq)``, 1 on the tokens the loss is taken over (a packed
            row's collator already leaves each sequence's first token out).

    Returns:
        ``(nll_sum, num_tokens)``: scalar float32 and scalar int64; the loss is their ratio.
    """
    logps, num_tokens = sequence_logps(logits, input_ids, completion_mask)
    return -logps.sum(), num_tokens.sum()
