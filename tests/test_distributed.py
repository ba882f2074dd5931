"""The cross-rank helpers on two gloo processes: ragged rows gathered in rank order, a flag ANDed."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_rlhf.distributed import all_rows, every_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]) if rank == 0 else torch.tensor([[7.0, 8.0]])
        result = (all_rows(rows), every_rank(True), every_rank(rank == 0), all_rows(torch.zeros(0, 2)))
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_helpers_agree_across_two_ranks(tmp_path):
    mp.start_processes(_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [7.0, 8.0]])
    for rank in (0, 1):
        rows, all_true, one_false, empty = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(rows, expected)  # 3 rows and 1 row: padded for the gather, cut back after
        assert all_true and not one_false
        assert empty.shape == (0, 2)


def test_helpers_are_the_identity_in_one_process():
    rows = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(all_rows(rows), rows) and not all_rows(rows).requires_grad
    assert every_rank(True) and not every_rank(torch.tensor(False))
