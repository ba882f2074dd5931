"""The cross-rank helpers on two gloo processes: ragged rows gathered in rank order, a flag ANDed, and
advantages whitened with the statistics of the whole rollout. The two ranks are spawned once for the
module (a spawned interpreter costs seconds of imports; the checks take milliseconds)."""

import math

import pytest
import torch
import torch.distributed as dist

from lit_rlhf.distributed import all_rows, every_rank, global_means, global_whiten
from lit_rlhf.losses import whiten
from tests import _distributed_workers as workers


def _whiten_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()


def _on_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]) if rank == 0 else torch.tensor([[7.0, 8.0]])
        x, mask = _whiten_inputs()
        share = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shares: a mean of per-rank means would differ
        result = {"helpers": (all_rows(rows), every_rank(True), every_rank(rank == 0), all_rows(torch.zeros(0, 2))),
                  "whitened": global_whiten(x[share], mask[share]),
                  # Rank 0 holds one item of "a" and none of "b" (its mean NaN), rank 1 three and two; no rank any "c".
                  "means": global_means({"a": (torch.tensor(1.0), 1), "b": (float("nan"), 0), "c": (0.0, 0)} if rank == 0
                                        else {"a": (torch.tensor(3.0), 3), "b": (5.0, 2), "c": (0.0, 0)})}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def on_two_ranks(tmp_path_factory) -> list[dict]:
    """What each of two gloo ranks computed with the helpers (``_on_rank``), in rank order."""
    out = tmp_path_factory.mktemp("ranks")
    return workers.on_two_ranks(_on_rank, out)


def test_helpers_agree_across_two_ranks(on_two_ranks):
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [7.0, 8.0]])
    for result in on_two_ranks:
        rows, all_true, one_false, empty = result["helpers"]
        torch.testing.assert_close(rows, expected)  # 3 rows and 1 row: padded for the gather, cut back after
        assert all_true and not one_false
        assert empty.shape == (0, 2)


def test_global_whiten_on_two_ranks_equals_whiten_of_the_whole_rollout(on_two_ranks):
    got = torch.cat([result["whitened"] for result in on_two_ranks])
    torch.testing.assert_close(got, whiten(*_whiten_inputs()))


def test_global_means_on_two_ranks_weigh_every_ranks_items(on_two_ranks):
    for result in on_two_ranks:
        means = result["means"]
        assert means["a"] == (2.5, 4.0)  # (1 x 1 + 3 x 3) / 4; the mean of the ranks' means would be 2
        assert means["b"] == (5.0, 2.0)  # rank 0's NaN mean of no items stays out
        assert math.isnan(means["c"][0]) and means["c"][1] == 0


def test_helpers_are_the_identity_in_one_process():
    rows = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(all_rows(rows), rows) and not all_rows(rows).requires_grad
    assert every_rank(True) and not every_rank(torch.tensor(False))
    assert global_means({"a": (torch.tensor(0.5), 3), "b": (1.0, 0)})["a"] == (0.5, 3.0)
