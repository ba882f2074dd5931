"""Under DDP every rank keeps the same state: KTO's reference point, the adaptive KL coefficient,
the running reward normaliser, and the weights after a step that one rank alone found non-finite
(two CPU processes, gloo; the run is ``ddp_sync_script.py``)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.methods.ddp_sync_script import KL_COEF, KL_HORIZON, KL_TARGET


SCRIPT = Path(__file__).with_name("ddp_sync_script.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2]))
    # A rank that skips a step alone either crashes the run (Lightning refuses a None loss under DDP)
    # or leaves the other waiting in the gradient all-reduce: the timeout turns a hang into a failure.
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                            timeout=240, cwd=SCRIPT.parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
def test_a_step_non_finite_on_one_rank_is_skipped_on_both(ranks):
    for method in ("kto", "ppo"):
        assert [r[f"{method}_skipped"] for r in ranks] == [1, 1]
        weights = [r[f"{method}_weights"] for r in ranks]
        assert weights[0].keys() == weights[1].keys() and weights[0]
        for name in weights[0]:
            assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.mark.slow
def test_kto_reference_point_is_the_mean_over_every_ranks_rows(ranks):
    local_estimates_differ = False
    for step0, step1 in zip(ranks[0]["kto"], ranks[1]["kto"]):
        rows0, rows1 = step0["local_logratio"], step1["local_logratio"]
        expected = max(0.0, sum(rows0 + rows1) / len(rows0 + rows1))
        assert step0["kl"] == pytest.approx(expected, abs=1e-6) and step1["kl"] == pytest.approx(expected, abs=1e-6)
        local_estimates_differ |= max(0.0, sum(rows0) / len(rows0)) != max(0.0, sum(rows1) / len(rows1))
    assert local_estimates_differ  # each rank's own batch would have given another reference point


@pytest.mark.slow
def test_adaptive_kl_and_running_normaliser_follow_global_statistics(ranks):
    beta, local_beta, kls, scores = KL_COEF, KL_COEF, [], []

    def updated(beta, kl):  # Ziegler et al.'s update with the mean and count of ``kl``
        error = min(max(sum(kl) / len(kl) / KL_TARGET - 1.0, -0.2), 0.2)
        return beta * (1.0 + error * len(kl) / KL_HORIZON)

    for rollout0, rollout1 in zip(ranks[0]["ppo"], ranks[1]["ppo"]):
        kl = rollout0["local_kl"] + rollout1["local_kl"]
        beta, local_beta = updated(beta, kl), updated(local_beta, rollout0["local_kl"])
        scores += rollout0["raw_scores"] + rollout1["raw_scores"]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        for rollout in (rollout0, rollout1):
            assert rollout["kl_coef"] == pytest.approx(beta, rel=1e-6)
            assert rollout["norm_count"] == len(scores)
            assert rollout["norm_mean"] == pytest.approx(mean, abs=1e-6)
            assert rollout["norm_std"] == pytest.approx(std, abs=1e-6)
        kls.append((kl, rollout0["local_kl"], rollout1["local_kl"]))
    # A controller fed one rank's rows (mean and count) would have drifted elsewhere: the check can fail.
    assert local_beta != pytest.approx(beta, rel=1e-6)
    _, first, second = kls[0]
    assert sum(first) / len(first) != sum(second) / len(second)
