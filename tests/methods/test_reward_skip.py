"""``nonfinite: skip`` in an online run: the prompts with a NaN reward are dropped whole and
counted, the rest trains; a rollout with nothing scored makes no update; the default stops the
fit. Never a NaN in the weights."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf import toy
from lit_rlhf.methods import GRPO
from lit_rlhf.rollout import RewardError, RewardSpec

from tests.methods.online_helpers import first_batch, make_online, prompts, trainer


def nan_for_the_prompts(prompts, completions):
    """NaN for every sample of a prompt starting with "the", the toy score otherwise."""
    return [math.nan if p.startswith("the ") else toy.score(c) for p, c in zip(prompts, completions)]


def always_nan(prompts, completions):
    return [math.nan] * len(completions)


def _grpo(function: str, **spec):
    reward = RewardSpec("function", function=f"tests.methods.test_reward_skip:{function}", **spec)
    return make_online(GRPO, rewards=[reward], num_samples_per_prompt=2, update_epochs=1, num_mini_batches=1)


def _lora(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # rollout_and_score outside a Trainer
def test_grpo_with_skip_drops_the_prompts_with_a_nan_and_trains_on_the_rest():
    method = _grpo("nan_for_the_prompts", nonfinite="skip")
    method.configure_model()
    batch = first_batch(method)
    k = method.num_samples_per_prompt
    scored = method.rollout_and_score(batch)
    kept = [p for p in batch["prompts"] if not p.startswith("the ")]
    assert 0 < len(kept) < len(batch["prompts"]), batch["prompts"]  # the data has both kinds in the first batch
    assert scored.prompts == [p for p in kept for _ in range(k)]
    assert scored.scores.shape == (len(kept) * k,) and torch.isfinite(scored.scores).all()
    assert scored.old_logprobs.shape[0] == len(kept) * k

    before = _lora(method)
    fit = trainer(rollouts=2)
    fit.fit(method, datamodule=prompts())
    after = _lora(method)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert fit.callback_metrics["rollout/skipped_nonfinite"] > 0
    assert method.rewards.skipped_nonfinite > 0


def test_a_rollout_with_nothing_scored_makes_no_update():
    method = _grpo("always_nan", nonfinite="skip")
    method.configure_model()
    before = _lora(method)
    trainer(rollouts=2).fit(method, datamodule=prompts())
    assert all(torch.equal(before[n], p) for n, p in _lora(method).items())
    assert method.rollout_count == 2 and method.rewards.skipped_nonfinite == 2 * 4 * 2


def test_default_nan_stops_the_fit_before_any_step():
    method = _grpo("always_nan")
    method.configure_model()
    before = _lora(method)
    with pytest.raises(RewardError, match=r"'tests\.methods\.test_reward_skip:always_nan' returned a non-finite score"):
        trainer(rollouts=1).fit(method, datamodule=prompts())
    assert all(torch.equal(before[n], p) for n, p in _lora(method).items())


def test_skip_is_refused_under_several_processes():
    import lightning.pytorch as pl

    method = _grpo("nan_for_the_prompts", nonfinite="skip")
    # A DDP Trainer of two processes, not launched: Lightning's setup hook runs as on each rank.
    method.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="runs on one process only"):
        method.setup("fit")
