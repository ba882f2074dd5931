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

Further, where the model does nothing after its head, the head need not run at all: with
``passthrough`` it hands back its selected input and the caller takes log-probs with the head's weight
fused in (``losses.head_token_logps``), so not even the kept positions' logits exist whole.
:func:`fused_head_supported` checks that once per model. An online forward, which calls its head once on
its last ``T + 1`` positions or twice with shared prompts, has :func:`head_skipped` hand back every call's input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward (a peft wrapper's base model's) takes transformers' ``logits_to_keep``,
    which limits the LM head to the last positions: what an online forward over ``[prompt | response]``
    and a decode step's prefill need. The instance's own ``forward`` is read: a wrapper may replace it."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextmanager
def head_on(head: nn.Module, keep: torch.Tensor, *, passthrough: bool = False) -> Iterator[list[torch.Tensor]]:
    """Within the block, ``head`` (a model's output embeddings) runs on the hidden states at ``keep``'s
    ``True`` positions only: its ``(rows, width, hidden)`` input becomes ``hidden[keep][None]``, so the
    model's logits are ``(1, keep.sum(), vocab)``, in row-major order of ``keep``. With ``passthrough``
    the head does not run at all: it returns that selected input, for a caller that applies the head's
    weight itself (``losses.head_token_logps``), so no logits are made.

    Yields a list that holds the selected ``(1, kept, hidden)`` input once the head received it (an input
    of another shape is left alone, and the head runs on it: the caller checks).
    """
    selected: list[torch.Tensor] = []

    def select(module, args):
        if selected or not args or args[0].shape[:2] != keep.shape:
            return None
        selected.append(args[0][keep][None])
        return (selected[0], *args[1:])

    forward = head.forward

    def skip_head(hidden, *args, **kwargs):
        return hidden if selected and hidden is selected[0] else forward(hidden, *args, **kwargs)

    handle = head.register_forward_pre_hook(select)
    try:
        with _forward_replaced(head, skip_head) if passthrough else nullcontext():
            yield selected
    finally:
        handle.remove()


@contextmanager
def head_skipped(head: nn.Module) -> Iterator[None]:
    """Within the block, every call of ``head`` hands back its input unchanged: the model's "logits" are the
    hidden states its head would have mapped, at whatever positions and however many calls the forward makes
    (an online forward keeps its last ``T + 1`` positions, or runs the shared prompts' last position and the
    responses in two calls: :func:`head_on`'s one selection fits neither). For a caller that applies the
    head's weight itself (``losses.head_token_logps``), where :func:`fused_head_supported` holds."""
    with _forward_replaced(head, lambda hidden, *args, **kwargs: hidden):
        yield


@contextmanager
def _forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    # An instance attribute: nn.Module.__call__ looks it up before the class's, and still runs the hooks.
    # accelerate's hooks wrap a module's forward as an instance attribute too: put back whichever was there.
    own_forward = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward


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


@torch.no_grad()
def fused_head_supported(forward: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, vocab_size: int,
                         device: torch.device) -> bool:
    """Whether the logits of ``forward(input_ids) -> logits`` are ``F.linear(hidden, head.weight,
    head.bias)`` of the head's selected input (:func:`head_on` with ``passthrough``), so that a caller may
    apply the head itself (``losses.head_token_logps``). The head must be a plain ``nn.Linear`` (a LoRA or
    quantized layer's ``weight`` is not its whole map) and the forward must leave the head's output alone
    (Gemma2's soft-capping, Cohere's logit scale, Granite's division would be skipped): checked bit for bit
    on what the forward returns, then on the logits (relative, so bf16 rounding passes). Assumes
    :func:`head_selection_supported`."""
    if type(head) is not nn.Linear:
        return False
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 6), generator=generator).to(device)
    keep = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    full = forward(input_ids).float()[keep]
    try:
        with head_on(head, keep, passthrough=True) as selected:
            output = forward(input_ids)
        if not selected or output.shape != selected[0].shape:
            return False
        if not torch.equal(output.to(selected[0].dtype), selected[0]):  # something ran after the head
            return False
        # Raises where the weight is not whole outside the forward (sharded by FSDP or ZeRO-3).
        logits = F.linear(selected[0][0], head.weight, head.bias).float()
    except (RuntimeError, ValueError, IndexError):
        return False
    return bool(logits.shape == full.shape and (logits - full).abs().max() <= 1e-3 * full.abs().max() + 1e-6)
