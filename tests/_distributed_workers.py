"""Two-rank gloo workers for tests/test_distributed_audit.py, in a module of light imports: each spawned
rank imports the module of its function, and the test module's (Lightning, transformers) cost seconds."""

import socket

import torch
import torch.distributed as dist

from lit_rlhf.distributed import global_mean_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_mean_inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(5, 3)  # five items (tokens): rank 0 holds one, rank 1 four


def token_mean_on_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        items = token_mean_inputs()[:1] if rank == 0 else token_mean_inputs()[1:]
        weight = torch.ones(3, requires_grad=True)
        loss, mean = global_mean_loss((items @ weight).sum(), torch.tensor(items.shape[0]))
        loss.backward()
        dist.all_reduce(weight.grad)  # DDP's gradient average
        torch.save({"grad": weight.grad / 2, "mean": mean}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
