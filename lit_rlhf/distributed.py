"""Cross-rank reductions for state that must stay identical on every data-parallel rank, computed as
one process holding the global batch would compute it.

A KL coefficient, a running reward normaliser, KTO's reference point, advantage whitening or the
decision to skip a step, each computed from one rank's rows, drifts apart between ranks under DDP;
a step that one rank skips and another takes also deadlocks DDP's gradient all-reduce. These
helpers use the default ``torch.distributed`` process group, which Lightning's DDP, FSDP and
DeepSpeed strategies initialise, and are the local computation in a single process. Each is a
collective: every rank must call it at the same point of the step. Torch only (no Lightning).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lit_rlhf.losses import whiten

__all__ = ["all_rows", "every_rank", "global_mean_loss", "global_means", "global_sum", "global_whiten", "is_distributed",
           "rank_seed"]


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



def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def global_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``lit_rlhf.losses.whiten`` with the mean and (unbiased) variance of the masked elements of
    every data-parallel rank's ``x``: the whole rollout, as one process holding it would compute.
    A collective under DDP/FSDP/DeepSpeed (every rank must call it); ``whiten`` on one process."""
    if not is_distributed():
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


def global_means(metrics: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]],
                 device: torch.device | str = "cpu") -> dict[str, tuple[float, float]]:
    """Weighted means over every data-parallel rank, in one all-reduce (a collective: every rank passes
    the same names, in the same order); the metrics themselves in one process.

    Args:
        metrics: ``name -> (mean, weight)``: this rank's mean of a metric over ``weight`` items (rows,
            tokens, micro-batches); an item-less metric (``weight`` 0) may hold any mean, NaN included.
        device: where the reduction runs; the device of the model (NCCL reduces CUDA tensors only).

    Returns:
        ``name -> (mean, weight)``: the mean over every rank's items, as one process holding them all
        takes it, and their number (NaN for the mean of a metric no rank had items for).
    """
    if not metrics:
        return {}

    def scalar(value):  # a tensor stays on its device: no host round trip per metric
        return torch.as_tensor(value, dtype=torch.float64, device=device).detach().reshape(())

    pairs = torch.stack([torch.stack([scalar(mean), scalar(weight)]) for mean, weight in metrics.values()])
    weights = pairs[:, 1]
    # Sums of mean x weight, so an item-less rank's NaN mean stays out.
    totals = _all_reduce_sum(torch.stack([torch.where(weights > 0, pairs[:, 0] * weights, 0.0), weights], dim=1))
    return {name: (total / weight if weight > 0 else float("nan"), weight)
            for name, (total, weight) in zip(metrics, totals.tolist())}


def global_mean_loss(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of a sum over items (loss tokens) over the items of every data-parallel rank, as one
    process holding them all takes it (a collective).

    Args:
        total: this rank's sum, with its graph.
        count: this rank's number of items.

    Returns:
        ``(loss, mean)``: ``loss`` is ``total`` scaled by ``world / global count``, whose gradient DDP's
        average over ranks turns into the global mean's (a per-rank mean would weigh an item by 1 / its
        rank's count); ``mean`` is the global mean, detached, for logging.
    """
    world = dist.get_world_size() if is_distributed() else 1
    global_total, global_count = global_sum(torch.stack([total.float(), count.float()]))  # one all-reduce
    global_count = global_count.clamp(min=1)
    return total * (world / global_count), global_total / global_count


def rank_seed(base_seed: int, rank: int, step: int) -> int:
    """A sampling seed distinct per ``(rank, step)`` and reproducible from them alone, so resumed
    runs draw the same samples and no two ranks draw the same random numbers."""
    return ((base_seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63 - 1)
