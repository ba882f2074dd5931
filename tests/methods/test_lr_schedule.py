"""The learning-rate schedule spans the optimizer steps the run takes: every lr the optimizer sees against
the formula written out, with gradient accumulation, epochs and ``limit_train_batches`` (the online methods'
steps per rollout and ``max_steps``: ``test_grpo``; a resumed run: the resume tests' weights)."""

import math

import lightning.pytorch as pl
import pytest

from lit_rlhf.data import SFTDataModule
from lit_rlhf.methods import SFT
from lit_rlhf.models import BankSpec, LoraSpec

from tests.paths import TOY_BASE, TOY_DATA


class SeenLearningRates(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_decay_ends_after_the_last_optimizer_step_of_accumulated_epochs(kind):
    """2 epochs of 5 batches (``limit_train_batches``) in windows of 3 take ceil(5 / 3) x 2 = 4 optimizer steps
    (each epoch's last window is short); with 1 warmup step the decay spans steps 1..3 and reaches 0 after step 3
    (transformers' convention: the step after the last would run at 0)."""
    pl.seed_everything(0)
    method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)), learning_rate=0.1, warmup_steps=1,
                 lr_scheduler=kind)
    data = SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=64)
    seen = SeenLearningRates()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=2, limit_train_batches=5, accumulate_grad_batches=3,
                         limit_val_batches=0, callbacks=[seen])
    trainer.fit(method, data)
    decay = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}[kind]
    expected = [0.1 * 1.0] + [0.1 * decay((step - 1) / 3) for step in range(1, 4)]
    assert trainer.global_step == 4
    assert seen.lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
