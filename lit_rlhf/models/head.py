"""The LM head run only on the positions a loss reads.

An offline method reads the logits that predict completion tokens; the prompt's logits (often 40% of
the tokens) would be computed and thrown away, and the head plus its log-softmax is a large share of a
small model's forward (about a fifth of a 1B Llama's FLOPs with a 128k vocabulary).

transformers' ``logits_to_keep`` cannot say this exactly: it keeps one set of sequence indices for
every row, so on padding-free rows (several sequences per row, each at its own offset) the union of the
rows' completion positions covers nearly every column. Instead, a forward pre-hook on the model's
output embeddings hands the head the hidden states of the kept positions only, as one ``(1, kept,
hidden)`` row; what the model does after its head (Gemma2's soft-capping, a logit scale) is
elementwise and still runs. :func:`head_selection_supported` checks once that a model's forward
allows this (one head call on the full hidden states, nothing shape-bound after it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import nn


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward (a peft wrapper's base model's) takes transformers' ``logits_to_keep``,
    which limits the LM head to the last positions: what an online forward over ``[prompt | response]``
    and a decode step's prefill need. The instance's own ``forward`` is read: a wrapper may replace it."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextmanager
def head_on(head: nn.Module, keep: torch.Tensor) -> Iterator[list[bool]]:
    """Within the block, ``head`` (a model's output embeddings) runs on the hidden states at ``keep``'s
    ``True`` positions only: its ``(rows, width, hidden)`` input becomes ``hidden[keep][None]``, so the
    model's logits are ``(1, keep.sum(), vocab)``, in row-major order of ``keep``.

    Yields a list that holds ``True`` once the head ran on the selection (an input of another shape is
    left alone: the caller checks).
    """
    applied: list[bool] = []

    def select(module, args):
        if applied or not args or args[0].shape[:2] != keep.shape:
            return None
        applied.append(True)
        return (args[0][keep][None], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield applied
    finally:
        handle.remove()


@torch.no_grad()
def head_selection_supported(forward: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, vocab_size: int,
                             device: torch.device) -> bool:
    """Whether ``forward(input_ids) -> logits`` gives, under :func:`head_on`, the full forward's logits
    at the kept positions: a forward that calls its head otherwise, or reshapes the logits after it,
    fails (or raises) here. The comparison is relative, so bf16 rounding passes. Token ids come from a
    private generator: no global RNG is consumed."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 6), generator=generator).to(device)
    keep = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    full = forward(input_ids).float()
    try:
        with head_on(head, keep) as applied:
            selected = forward(input_ids).float()
    except (RuntimeError, ValueError, IndexError):
        return False
    if not applied or selected.shape != (1, int(keep.sum()), full.shape[-1]):
        return False
    return bool((selected[0] - full[keep]).abs().max() <= 1e-3 * full.abs().max() + 1e-6)
