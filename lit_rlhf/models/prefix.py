"""One forward per distinct prompt: the rows that share a prompt share its keys and values.

GRPO and RLOO sample ``k`` responses per prompt, so a rollout holds every prompt ``k`` times, and a
forward over ``[prompt | response]`` rows runs each prompt ``k`` times (left padding included). Here
the distinct prompts run once, with the KV cache on; the cache is gathered to one entry per row and
the responses run on top of it. Gradients flow back through the gathered cache, so the prompt's
layers get the sum of their rows' gradients: the same logits and gradients as the whole rows, for
``(k - 1) / k`` of the prompt tokens' compute and activation memory less.

A model qualifies when :func:`prompt_sharing_supported` finds the two forwards equal on a tiny
rollout and its cache has no sliding-window layer (a window longer than the probe's rows would hide
a difference). A layer under gradient checkpointing drops the cache in a forward with gradients;
the caller must not share prompts there (:func:`shared_prompt_logits` raises if it happened).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

#: ``forward(input_ids, attention_mask, position_ids, **kwargs) -> causal LM output`` (``AdapterBank``).
Forward = Callable[..., object]


class PromptGroups(NamedTuple):
    """Rows sharing a prompt: ``first`` (one row index per distinct prompt) and ``of_row`` (each row's
    distinct prompt, an index into ``first``)."""

    first: torch.Tensor
    of_row: torch.Tensor

    @property
    def shared(self) -> bool:
        """Whether two rows share a prompt (else running the prompts apart saves nothing)."""
        return self.first.numel() < self.of_row.numel()


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptGroups:
    """The distinct prompts of left-padded rows."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    distinct, of_row = torch.unique(key, dim=0, return_inverse=True)
    rows = key.shape[0]
    first = torch.full((distinct.shape[0],), rows, dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, of_row, torch.arange(rows, device=key.device), reduce="amin")
    return PromptGroups(first, of_row)


def shared_prompt_logits(forward: Forward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         response_ids: torch.Tensor, response_mask: torch.Tensor, groups: PromptGroups) -> torch.Tensor:
    """``(rows, T + 1, vocab)`` logits of ``[prompt | response]`` rows at the last prompt position and every
    response position (what ``logits_to_keep = T + 1`` gives over whole rows), each distinct prompt run once.

    Positions are counted over attended tokens (left padding skipped), as the rollout engines sample."""
    width = prompt_ids.shape[1]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    first = groups.first
    prompt = forward(prompt_ids[first], prompt_mask[first], position_ids[first, :width], use_cache=True, logits_to_keep=1)
    cache = prompt.cache
    if cache is not None:
        cache.batch_select_indices(groups.of_row)
        response = forward(response_ids, attention_mask, position_ids[:, width:], cache=cache, use_cache=True)
    if cache is None or cache.get_seq_length() != width + response_ids.shape[1]:
        # Checkpointed layers set the cache aside: the responses would not see their prompts.
        raise RuntimeError("the forward dropped the prompts' KV cache (gradient checkpointing?); "
                           "prompts cannot be shared in this forward")
    return torch.cat([prompt.logits[:, -1:].index_select(0, groups.of_row), response.logits], dim=1)


@torch.no_grad()
def prompt_sharing_supported(forward: Forward, vocab_size: int, device: torch.device) -> bool:
    """Whether :func:`shared_prompt_logits` gives ``forward``'s whole-row logits on a tiny rollout (two
    prompts, two rows each, left and right padding). Relative comparison, so bf16 rounding passes.
    Token ids come from a private generator: no global RNG is consumed."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, vocab_size, (2, 5), generator=generator).repeat_interleave(2, dim=0)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 1]] * 2)
    response_ids = torch.randint(0, vocab_size, (4, 3), generator=generator)
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    prompt_ids, prompt_mask, response_ids, response_mask = (
        t.to(device) for t in (prompt_ids, prompt_mask, response_ids, response_mask))
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    try:
        whole = forward(torch.cat([prompt_ids, response_ids], dim=1), attention_mask, position_ids).logits[:, -4:]
        groups = prompt_groups(prompt_ids, prompt_mask)
        shared = shared_prompt_logits(forward, prompt_ids, prompt_mask, response_ids, response_mask, groups)
        cache = forward(prompt_ids[:1], prompt_mask[:1], position_ids[:1, :5], use_cache=True).cache
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError):
        return False
    if cache is None or any(getattr(cache, "is_sliding", [])) or shared.shape != whole.shape:
        return False
    valid = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask], dim=1).bool()
    whole, shared = whole.float()[valid], shared.float()[valid]
    return bool((shared - whole).abs().max() <= 1e-3 * whole.abs().max() + 1e-6)
