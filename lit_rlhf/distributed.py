"""Cross-rank reductions for state that must stay identical on every data-parallel rank.

A KL coefficient, a running reward normaliser, KTO's reference point or the decision to skip
a step, each computed from one rank's rows, drifts apart between ranks under DDP; a step that
one rank skips and another takes also deadlocks DDP's gradient all-reduce. These helpers use
the default ``torch.distributed`` process group, which Lightning's DDP and DeepSpeed strategies
initialise, and are the identity in a single process. Each is a collective: every rank must
call it at the same point of the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_rows", "every_rank", "is_distributed"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of ``rows`` from every rank, concatenated in rank order (``rows`` itself in one process).

    Ranks may hold different numbers of rows (the trailing dimensions must match): each is
    padded to the longest before the gather and cut back after. Detached.

    Args:
        rows: ``(n, ...)``; ``n`` may differ between ranks.

    Returns:
        ``(sum of n over ranks, ...)``, the same on every rank.
    """
    rows = rows.detach()
    if not is_distributed():
        return rows
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def every_rank(flag: bool | torch.Tensor, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every rank (a logical AND across ranks).

    Args:
        flag: this rank's verdict (a bool or a one-element tensor).
        device: where the reduction runs; the device of the model (NCCL reduces CUDA tensors only).
    """
    local = torch.as_tensor(flag, dtype=torch.bool).to(device=device, dtype=torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return bool(local.item())
