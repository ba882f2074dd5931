"""The learning-rate schedule spans the optimizer steps the run takes: every lr the optimizer sees against
the formula written out, with gradient accumulation, epochs and ``limit_train_batches`` (two DDP ranks:
``tests/test_distributed_audit.py``; the online methods' steps per rollout and ``max_steps``: ``test_grpo``;
a resumed run: the resume tests' weights)."""

import math

import lightning.pytorch as pl
import pytest

from lit_rlhf.methods import ResumableCheckpoint

from tests._distributed_workers import learning_rates


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_decay_ends_after_the_last_optimizer_step_of_accumulated_epochs(kind):
    """2 epochs of 5 batches (``limit_train_batches``) in windows of 3 take ceil(5 / 3) x 2 = 4 optimizer steps
    (each epoch's last window is short); with 1 warmup step the decay spans steps 1..3 and reaches 0 after step 3
    (transformers' convention: a step after the last would run at 0)."""
    pl.seed_everything(0)
    decay = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}[kind]
    expected = [0.1] + [0.1 * decay((step - 1) / 3) for step in range(1, 5)]
    assert learning_rates(kind) == pytest.approx(expected, abs=1e-12)


def test_a_run_resumed_mid_epoch_continues_the_schedule(tmp_path):
    """Resumed from the checkpoint of step 1 (inside epoch 0), the run takes steps 1..3 at the uninterrupted run's
    learning rates and ends the decay at 0."""
    def every_step(root):  # the resumed run's too, as Lightning asks
        return [ResumableCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)]

    pl.seed_everything(0)
    straight = learning_rates(callbacks=every_step(tmp_path), default_root_dir=tmp_path)
    pl.seed_everything(0)
    resumed = learning_rates(callbacks=every_step(tmp_path / "resumed"), ckpt_path=next(tmp_path.glob("*step=1.ckpt")),
                             default_root_dir=tmp_path / "resumed")
    assert resumed == pytest.approx(straight[1:], abs=1e-12) and resumed[-1] == 0


def test_a_warmup_longer_than_the_run_is_named_in_one_line(caplog):
    """``--trainer.max_steps 2`` on a config whose warmup is 3 steps: one warning names both numbers; a warmup the
    run completes (2 of 2 steps) says nothing."""
    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.methods import SFT
    from lit_rlhf.models import BankSpec, LoraSpec

    from tests.paths import TOY_BASE, TOY_DATA

    def fit(warmup_steps):
        method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)), warmup_steps=warmup_steps)
        data = SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=64)
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, max_steps=2, limit_val_batches=0).fit(method, data)
        return [r.getMessage() for r in caplog.records if "warmup_steps" in r.getMessage()]

    caplog.set_level("WARNING", logger="lit_rlhf.methods")
    assert fit(2) == []
    assert fit(3) == ["warmup_steps=3 is longer than this run's 2 optimizer steps: the learning rate never reaches "
                      "learning_rate=0.0001 (lower warmup_steps or train longer)"]
