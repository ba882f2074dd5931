"""Two-rank gloo workers for tests/test_distributed_audit.py, in a module of light imports: each spawned
rank imports the module of its function, and the test module's (Lightning, transformers) cost seconds."""

import socket
from types import SimpleNamespace

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


def rollout_inputs() -> SimpleNamespace:
    """A rollout of 4 rows (2 per rank) with two reward sources, as ``OnlineMethod.rollout_metrics`` reads it."""
    return SimpleNamespace(scores=torch.tensor([1.0, 2.0, 3.0, 10.0]), response_lengths=torch.tensor([2, 4, 6, 20]),
                           ended=torch.tensor([True, True, False, False]),
                           per_source={"a": torch.tensor([0.0, 1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 1.0, 1.0, 7.0])})


def token_mean_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: a token mean over its share of ``token_mean_inputs`` (``global_mean_loss``),
    with DDP's gradient average."""
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


def rollout_metrics_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``OnlineMethod.rollout_metrics`` of its half of ``rollout_inputs``."""
    from lit_rlhf.methods.online import OnlineMethod  # seconds of imports: only in the ranks that need it

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        whole, share = rollout_inputs(), slice(2 * rank, 2 * rank + 2)
        mine = SimpleNamespace(scores=whole.scores[share], per_source={n: v[share] for n, v in whole.per_source.items()},
                               rollout=SimpleNamespace(response_lengths=whole.response_lengths[share],
                                                       ended=whole.ended[share]))
        metrics = OnlineMethod.rollout_metrics(SimpleNamespace(rollout_count=1), mine, None)
        torch.save({"metrics": metrics}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
