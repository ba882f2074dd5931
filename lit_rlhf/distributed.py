"""Statistics over the data-parallel ranks, as one process holding the global batch computes them.

Torch only (no Lightning): the methods call these whatever the strategy; on one process (or
without an initialised process group) they reduce to the local computation.
"""

from __future__ import annotations

import torch

from lit_rlhf.losses import whiten


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def global_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``lit_rlhf.losses.whiten`` with the mean and (unbiased) variance of the masked elements of
    every data-parallel rank's ``x``: the whole rollout, as one process holding it would compute.
    A collective under DDP/FSDP/DeepSpeed (every rank must call it); ``whiten`` on one process."""
    if not _distributed():
        return whiten(x, mask, shift_mean=shift_mean, eps=eps)
    mask = mask.to(x.dtype)
    totals = _all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = (totals[0] / totals[1].clamp(min=1)).to(x.dtype)
    square = _all_reduce_sum((((x - mean) ** 2) * mask).sum().double().reshape(1))[0]
    var = (square / (totals[1] - 1).clamp(min=1)).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the data-parallel ranks (a collective); itself on one process."""
    return _all_reduce_sum(value.detach().clone())


def rank_seed(base_seed: int, rank: int, step: int) -> int:
    """A sampling seed distinct per ``(rank, step)`` and reproducible from them alone, so resumed
    runs draw the same samples and no two ranks draw the same random numbers."""
    return ((base_seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63 - 1)
