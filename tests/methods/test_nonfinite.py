"""A non-finite loss never reaches the weights or the optimizer state, is counted and logged, and
a run that keeps producing them stops with a clear error (automatic and manual optimization;
the two-rank case is in test_ddp_sync.py)."""

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import SFTDataModule
from lit_rlhf.methods.rloo import RLOO
from lit_rlhf.methods.sft import SFT
from lit_rlhf.models import BankSpec, LoraSpec

from tests.methods.online_helpers import make_online, prompts, trainer
from tests.paths import TOY_BASE, TOY_DATA


class FlakySFT(SFT):
    """SFT whose training loss is NaN at the given optimizer steps."""

    def __init__(self, nan_steps, **kwargs):
        super().__init__(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)), **kwargs)
        self.nan_steps = set(nan_steps)

    def nll(self, batch):
        nll_sum, num_tokens = super().nll(batch)
        if self.trainer.training and self.global_step in self.nan_steps:
            nll_sum = nll_sum * float("nan")
        return nll_sum, num_tokens


class Snapshots(pl.Callback):
    """Trainable tensors and AdamW's state after every optimizer step."""

    def __init__(self):
        self.weights, self.optimizer_states = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in module.bank.trainable_parameters()])
        state = trainer.optimizers[0].state
        self.optimizer_states.append([{k: v.clone() for k, v in state[p].items()} if p in state else {}
                                      for p in module.bank.trainable_parameters()])


def fit_sft(method, steps, callbacks=(), ckpt_path=None):
    fit = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks))
    fit.fit(method, SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=48), ckpt_path=ckpt_path)
    return fit


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_non_finite_step_changes_nothing_and_is_counted():
    pl.seed_everything(0)
    # Weight decay and Adam's momentum would move the weights even with zeroed gradients: the step must not run.
    method = FlakySFT(nan_steps={1, 2}, learning_rate=1e-2, weight_decay=0.1, max_consecutive_nonfinite=3)
    snapshots = Snapshots()
    fit = fit_sft(method, steps=4, callbacks=[snapshots])
    weights, states = snapshots.weights, snapshots.optimizer_states
    assert same(weights[0], weights[1]) and same(weights[1], weights[2])
    assert all(same(a.values(), b.values()) for a, b in zip(states[0], states[2]))
    assert not same(weights[2], weights[3])  # the next finite step trains again
    assert method.skipped_nonfinite == 2
    assert fit.callback_metrics["train/skipped_nonfinite"] == 2.0


def test_consecutive_non_finite_steps_stop_the_run():
    pl.seed_everything(0)
    method = FlakySFT(nan_steps={1, 2, 3}, max_consecutive_nonfinite=3)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row had a non-finite loss .* max_consecutive_nonfinite"):
        fit_sft(method, steps=8)
    assert method.skipped_nonfinite == 3 and method.global_step == 3  # stopped in the third skipped step
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be >= 1, got 0"):
        FlakySFT(nan_steps=(), max_consecutive_nonfinite=0)


class FlakyRLOO(RLOO):
    """RLOO whose micro-batch loss is NaN at the given calls of ``policy_loss`` (counted from 0)."""

    nan_calls: set = set()
    calls = 0

    def policy_loss(self, batch):
        loss, metrics = super().policy_loss(batch)
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.nan_calls else loss), metrics


def test_online_update_skips_counts_and_stops():
    pl.seed_everything(0)
    method = make_online(FlakyRLOO, kl_coef=0.0, max_new_tokens=4, num_samples_per_prompt=2, update_epochs=1,
                         num_mini_batches=2, max_consecutive_nonfinite=3)
    method.nan_calls = {1, 2, 3}  # the first rollout's second mini-batch, then both of the second rollout's
    fit = trainer(rollouts=2)
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite loss"):
        fit.fit(method, datamodule=prompts(batch_size=2))
    assert method.skipped_nonfinite == 3
    assert fit.callback_metrics["train/skipped_nonfinite"] == 1.0  # logged with the first rollout's metrics


def test_a_resumed_run_keeps_its_streak_of_non_finite_steps(tmp_path):
    """Two skipped steps, a checkpoint, a resume: the third skip in a row stops the run, as it would have
    without the interruption (a fresh streak would give a diverged run max_consecutive_nonfinite more steps)."""
    pl.seed_everything(0)
    first = FlakySFT(nan_steps={1, 2}, max_consecutive_nonfinite=3)
    fit = fit_sft(first, steps=3)
    fit.save_checkpoint(tmp_path / "skipping.ckpt")
    resumed = FlakySFT(nan_steps={3}, max_consecutive_nonfinite=3)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row had a non-finite loss \(step 3, 3 skipped"):
        fit_sft(resumed, steps=5, ckpt_path=tmp_path / "skipping.ckpt")
    assert resumed.skipped_nonfinite == 3


# -- the learning-rate schedule: a skipped step leaves it where it was ---------------------------------------


def linear_after_one_warmup_step(step: int, total: int) -> float:
    """``schedule_factor`` written out for ``warmup_steps=1``, linear decay over ``total`` steps, times lr 0.1."""
    return 0.1 * (1.0 if step < 1 else 1 - (step - 1) / (total - 1))


class LearningRates(pl.Callback):
    """The learning rate of every optimizer step the run attempts (skipped or not), then the one after the last."""

    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.seen.append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer, module):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_skipped_offline_step_leaves_the_learning_rate_schedule_where_it_was():
    """5 steps, the 2nd and 3rd skipped: the schedule (1 warmup step, linear decay over 5) advances after the 3
    steps applied only, as the online update's (and transformers' Trainer's, for an AMP step its grad scaler
    skips): steps 1..3 run at the rate of schedule step 1, and the run ends 2 steps short of the decay."""
    pl.seed_everything(0)
    method = FlakySFT(nan_steps={1, 2}, learning_rate=0.1, warmup_steps=1, lr_scheduler="linear")
    rates = LearningRates()
    fit_sft(method, steps=5, callbacks=[rates])
    applied_before = [0, 1, 1, 1, 2, 3]  # schedule steps taken before each attempted step, then after the run
    assert rates.seen == pytest.approx([linear_after_one_warmup_step(s, 5) for s in applied_before], abs=1e-12)


def test_a_skipped_online_step_leaves_the_learning_rate_schedule_where_it_was():
    """2 rollouts of 2 optimizer steps, the 2nd skipped: as offline, the schedule over the 4 planned steps advances
    after the 3 applied ones only."""
    rates = []

    class Recorded(FlakyRLOO):
        def policy_loss(self, batch):  # one micro-batch per optimizer step
            rates.append(self.optimizers().param_groups[0]["lr"])
            return super().policy_loss(batch)

    pl.seed_everything(0)
    method = make_online(Recorded, kl_coef=0.0, max_new_tokens=4, num_samples_per_prompt=2, update_epochs=1,
                         num_mini_batches=2, learning_rate=0.1, warmup_steps=1, lr_scheduler="linear")
    method.nan_calls = {1}
    fit = trainer(rollouts=2)
    fit.fit(method, datamodule=prompts(batch_size=2))
    assert method.skipped_nonfinite == 1
    rates.append(fit.optimizers[0].param_groups[0]["lr"])
    assert rates == pytest.approx([linear_after_one_warmup_step(s, 4) for s in (0, 1, 1, 2, 3)], abs=1e-12)
