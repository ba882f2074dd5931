"""Losses under data parallelism equal one process's over the same global batch.

Each rank reads its own share of one shuffled epoch; the logged rollout metrics are over every rank's
rows. Token means over every rank: ``global_mean_loss``
on two gloo processes, and supervised KD (GKD) on two DDP processes against one (slow). Losses over
weighted rows (best-of-n, Online DPO): a step split between ranks takes the gradient one process takes
over the whole step.

DDP averages the ranks' gradients; ``OnlineMethod.update`` divides each loss by the step's
``step_weights`` summed over every rank and divided by their number (``step_token_count``). The step is
split here as ``update`` splits it between two ranks (each rank's rows in a micro-batch of their own),
with that arithmetic: a loss normalised by its own rank's rows (kept tokens, untied pairs) weighs a row
by 1 / its rank's count, and the split gradient differs from the whole one.
"""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

from lit_rlhf.data import PromptDataModule
from lit_rlhf.distributed import global_mean_loss
from lit_rlhf.methods import BestOfN, OnlineDPO
from lit_rlhf.methods.best_of_n import BestOfNTargets

from tests._distributed_workers import (
    learning_rates_on_rank,
    on_two_ranks,
    rollout_metrics_on_rank,
    token_mean_validation_logs,
    token_mean_validation_logs_on_rank,
    token_mean_inputs,
    token_mean_on_rank,
    training_step_logs,
    training_step_logs_on_rank,
    update_metrics_on_rank,
    validation_logs,
    validation_logs_on_rank,
    write_validation_rows,
)
from tests.methods.online_helpers import first_batch, make_online, perturbed
from tests.paths import TOY_BASE
from tests.test_scale import _compare_with_one_process


def data_parallel_gradient(method, scored, targets, shares: list[torch.Tensor]) -> list[torch.Tensor]:
    """The averaged gradient of one optimizer step whose rows ``shares[r]`` sit on rank ``r``."""
    world = len(shares)
    weights = method.step_weights(scored, targets)
    step = weights[torch.cat(shares)].sum().float() / world  # step_token_count: all-reduced, / world
    params = list(method.bank.trainable_parameters())
    for p in params:
        p.grad = None
    for share in shares:
        batch = method.select(scored, targets, share, step_rows=share.numel(), step_tokens=step)
        loss, _ = method.policy_loss(batch)
        (loss * method.accumulation_weight(batch) / world).backward()  # DDP's gradient average
    return [p.grad.clone() for p in params]


def assert_two_ranks_match_one_process(method, scored, targets) -> None:
    rows = torch.arange(scored.scores.shape[0])
    method.bank.eval()  # no dropout: the two passes see the same network
    whole = data_parallel_gradient(method, scored, targets, [rows])
    split = data_parallel_gradient(method, scored, targets, list(rows.chunk(2)))
    for one, two in zip(whole, split):
        torch.testing.assert_close(two, one)


def test_best_of_n_sft_mean_is_over_the_kept_tokens_of_every_rank():
    pl.seed_everything(0)
    method = perturbed(make_online(BestOfN, num_samples_per_prompt=2, update_epochs=1, num_mini_batches=1))
    scored = method.rollout_and_score(first_batch(method, batch_size=2))  # 4 rows: 2 per rank
    # Rank 0 keeps one row, rank 1 both (as ``min_score`` leaves them): unequal kept tokens per rank.
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    targets = BestOfNTargets(is_best=torch.ones(4, dtype=torch.bool), weight=weight)
    assert (scored.rollout.response_mask.sum(1) > 0).all()
    assert_two_ranks_match_one_process(method, scored, targets)


def test_online_dpo_mean_is_over_the_untied_pairs_of_every_rank():
    pl.seed_everything(0)
    method = perturbed(make_online(OnlineDPO, num_samples_per_prompt=2, beta=0.5, update_epochs=1,
                                   num_mini_batches=1))
    scored = method.rollout_and_score(first_batch(method, batch_size=4))  # 4 pairs: 2 per rank
    pairs = scored.scores.view(-1, 2)
    pairs[:, 1] = pairs[:, 0] + torch.tensor([1.0, 0.0, -1.0, 1.0])  # pair 1 (rank 0) a tie; the rest decided
    targets = method.compute_advantages(scored)
    assert targets.pair_weight.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    assert_two_ranks_match_one_process(method, scored, targets)


# -- a token mean over every rank (SFT, GKD): two gloo processes ---------------------------------------


def test_global_mean_loss_on_two_ranks_is_the_mean_over_every_ranks_items(tmp_path):
    items = token_mean_inputs()
    for got in on_two_ranks(token_mean_on_rank, tmp_path):
        # One process: d/dw mean_i(x_i . w) = mean_i x_i. Per-rank means would give (x_0 + mean(x_1..4)) / 2.
        torch.testing.assert_close(got["grad"], items.mean(0))
        torch.testing.assert_close(got["mean"], items.sum(1).mean())


@pytest.mark.slow  # each spawned rank imports Lightning and transformers: about 14 s on 2 busy cores
def test_rollout_metrics_on_two_ranks_are_over_every_ranks_rows(tmp_path):
    # Rank 0 alone would log scores 1.5, length 3, ended 1, 4 episodes after the second rollout.
    expected = {"objective/scores": 4.0, "response_length": 8.0, "rollout/ended_with_eos": 0.5,
                "rollout/episodes": 8.0, "objective/scores/a": 1.5, "objective/scores/b": 2.5}
    for got in on_two_ranks(rollout_metrics_on_rank, tmp_path):
        assert got["metrics"] == pytest.approx(expected)


def test_global_mean_loss_in_one_process_is_the_mean():
    total, count = torch.tensor(6.0, requires_grad=True), torch.tensor(4)
    loss, mean = global_mean_loss(total, count)
    assert loss.item() == mean.item() == 1.5 and loss.requires_grad and not mean.requires_grad


@pytest.mark.slow  # three fits at once (about a minute on 2 busy cores), as test_scale's comparisons
def test_kd_on_two_processes_matches_one_process(tmp_path):
    """Supervised KD (GKD, ``lmbda: 0``) with packed rows: the ranks' batches hold different token counts,
    so the JSD token mean over every rank (not each rank's own) is what reaches the one-process weights."""
    one, _ = _compare_with_one_process(tmp_path, "kd", "ddp", per_rank_batch=4, steps=3)
    assert any(v.abs().max() > 0 for k, v in one["state"].items() if "lora_B" in k)


# -- data: what each rank reads ------------------------------------------------------------------------


def test_two_ranks_split_one_shuffled_epoch_and_hold_out_the_same_validation_rows(tmp_path):
    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(f'{{"prompt": "the prompt number {i}"}}\n' for i in range(13)))
    tokenizer = AutoTokenizer.from_pretrained(TOY_BASE)
    ranks = []
    for rank in (0, 1):
        data = PromptDataModule(train=str(train), val_fraction=0.25, batch_size=2, max_length=32, seed=5)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what train_dataloader reads of it
        data.prepare(tokenizer)
        sampler = data.train_dataloader().sampler
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append(list(sampler))
        ranks.append((data.train_examples, data.val_examples, epochs))
    (train0, val0, epochs0), (train1, val1, epochs1) = ranks
    assert train0 == train1 and val0 == val1 and len(val0) == 3  # one hold-out split, the same on every rank
    for rows0, rows1 in zip(epochs0, epochs1):
        # 10 training rows: 5 distinct ones per rank, together the epoch once (no padding needed).
        assert len(rows0) == len(rows1) == 5 and sorted(rows0 + rows1) == list(range(10))
    assert epochs0[0] != epochs0[1]  # shuffled per epoch, with one seed: the ranks' shares stay disjoint


# -- the offline methods' training-step metrics: over every rank's rows ----------------------------------


def test_training_step_metrics_on_two_ranks_are_those_of_one_process_on_both_ranks_rows(tmp_path):
    """DPO, KTO, RewardModeling and SFT log, on every rank, what one process logs on the union of the ranks'
    rows (pairs, labelled rows, loss tokens): rank 0 holds 1 of 5 rows, so its own metrics (or the mean of the
    two ranks') differ; KTO's rank 0 holds no undesirable row, yet its rejected means and margin are logged."""
    ranks = [saved["logs"] for saved in on_two_ranks(training_step_logs_on_rank, tmp_path, "fork")]
    one_process = training_step_logs(None)
    assert set(one_process["kto"]) >= {"rewards/rejected", "rewards/margins", "logps/rejected", "kl", "loss"}
    for logs in ranks:
        for method, expected in one_process.items():
            assert logs[method] == pytest.approx(expected, rel=1e-5, abs=1e-6), method


# -- the online methods' update metrics: over every rank's micro-batches -----------------------------------


@pytest.fixture(scope="module")
def online_logs_on_two_ranks(tmp_path_factory) -> list[dict]:
    """``update_metrics_on_rank`` of each of two ranks (one GRPO and one PPO rollout each), in rank order."""
    out = tmp_path_factory.mktemp("online_logs")
    return on_two_ranks(update_metrics_on_rank, out, "fork")


def test_update_metrics_on_two_ranks_are_the_mean_over_every_ranks_micro_batches(online_logs_on_two_ranks):
    """GRPO and PPO under DDP log (on every rank) each update metric as the mean over the micro-batches of
    both ranks, each rank sampling its own rollout; rank 0's own mean differs (else the check is empty)."""
    ranks = online_logs_on_two_ranks
    for method in ("grpo", "ppo"):
        micro = [rank[method]["micro_batches"] for rank in ranks]
        assert len(micro[0]) == len(micro[1]) == 4  # update_epochs 2 x num_mini_batches 2, every step taken
        names = set(micro[0][0])
        assert {"loss/policy", "policy/clipfrac", "policy/approxkl"} <= names
        expected = {n: sum(m[n] for share in micro for m in share) / sum(map(len, micro)) for n in names}
        rank0_alone = {n: sum(m[n] for m in micro[0]) / len(micro[0]) for n in names}
        assert rank0_alone["loss/policy"] != pytest.approx(expected["loss/policy"], rel=1e-3), method
        for rank in ranks:
            logged = {n: v for n, v in rank[method]["logged"].items() if n in names}
            assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7), method


def test_rollout_metrics_of_online_methods_on_two_ranks_are_over_every_ranks_rows(online_logs_on_two_ranks):
    """What GRPO and PPO add to the shared rollout metrics (entropy, KL, reward std, ...) is logged as the
    mean over both ranks' rows, not as rank 0's (the shared ones, scores and lengths, are global already)."""
    ranks = online_logs_on_two_ranks
    for method in ("grpo", "ppo"):
        (local0, rows0), (local1, rows1) = (rank[method]["rollout"] for rank in ranks)
        names = set(local0) - set(ranks[0][method]["micro_batches"][0])  # the update's own are checked above
        expected = {n: (local0[n] * rows0 + local1[n] * rows1) / (rows0 + rows1) for n in names}
        assert local0["objective/entropy"] != pytest.approx(expected["objective/entropy"], rel=1e-3), method
        for rank in ranks:
            logged = {n: v for n, v in rank[method]["logged"].items() if n in names}
            assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7), method


# -- validation: every row once --------------------------------------------------------------------------


def test_validation_metrics_on_two_ranks_count_every_row_once_as_one_process(tmp_path):
    """SFT, DPO, the reward model and KTO validated on two DDP ranks log what one process logs: 7 rows in batches
    of 3 are dealt out as 3 + 1 and 2 + 1 rows, where Lightning's sampler gave rank 1 row 0 a second time. KTO's loss and KL
    are left out: its reference point is each batch's, over the ranks' batches together."""
    write_validation_rows(tmp_path)
    one_process = validation_logs(tmp_path, devices=1)
    for logs in (saved["logs"] for saved in on_two_ranks(validation_logs_on_rank, tmp_path, "fork")):
        for method, expected in one_process.items():
            expected = {k: v for k, v in expected.items() if method != "kto" or k not in ("val/loss", "val/kl")}
            assert {k: logs[method][k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6), method



def test_token_mean_validation_on_two_ranks_where_one_ranks_batches_hold_no_loss_tokens(tmp_path):
    """SFT and GKD validated on two DDP ranks, rank 0's one batch without loss tokens and rank 1's with some, log
    what one process logs (the token means over rank 1's tokens) on both ranks: no rank leaves out a collective
    the other enters (the timeout turns such a hang into a failure)."""
    one_process = token_mean_validation_logs(tmp_path, devices=1)
    assert set(one_process["sft"]) == {"val/loss", "val/ppl"} and set(one_process["gkd"]) == {"val/loss", "val/kl_teacher"}
    for saved in on_two_ranks(token_mean_validation_logs_on_rank, tmp_path, "fork", timeout=120):
        for method, expected in one_process.items():
            assert saved["logs"][method] == pytest.approx(expected, rel=1e-5, abs=1e-6), method


# -- the learning-rate schedule: over the optimizer steps each rank takes ---------------------------------


def test_the_learning_rate_schedule_on_two_ranks_spans_the_steps_each_rank_takes(tmp_path):
    """``limit_train_batches`` counts each rank's batches: 2 epochs of 5 in windows of 3 are 4 optimizer steps on
    each rank, the linear decay after 1 warmup step spans them and ends at 0 (as in one process:
    ``tests/methods/test_lr_schedule.py``)."""
    expected = [0.1, 0.1, 0.1 * 2 / 3, 0.1 / 3, 0.0]
    for saved in on_two_ranks(learning_rates_on_rank, tmp_path, "fork"):
        assert saved["lrs"] == pytest.approx(expected, abs=1e-12)
