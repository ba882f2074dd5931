"""The learning-rate schedule spans the optimizer steps the run takes: every lr the optimizer sees against
the formula written out, with gradient accumulation, epochs and ``limit_train_batches`` (two DDP ranks:
``tests/test_distributed_audit.py``; the online methods' steps per rollout and ``max_steps``: ``test_grpo``;
a resumed run: the resume tests' weights)."""

import math

import lightning.pytorch as pl
import pytest

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
