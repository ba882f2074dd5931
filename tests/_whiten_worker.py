"""One rank of the two-process global_whiten test (a module of its own: spawned processes import
it, and it imports only torch and lit_rlhf.distributed)."""

import torch
import torch.distributed as dist

from lit_rlhf.distributed import global_whiten


def whiten_on_a_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shares: a mean of per-rank means would differ
    torch.save(global_whiten(x[rows], mask[rows]), f"{out}/{rank}.pt")
    dist.destroy_process_group()
