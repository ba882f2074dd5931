"""What the shipped configs train with, beside what they parse to (tests/test_cli.py): the gradient
clipping a TRL user gets by default (``max_grad_norm=1.0``)."""

from __future__ import annotations

import importlib
import inspect

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lit_rlhf.cli import build_cli
from lit_rlhf.methods.online import OnlineMethod

from tests.paths import REPO

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _method_class(config: dict) -> type:
    module, _, name = config["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_clips_the_gradient_norm_at_1(config):
    """TRL clips every trainer's gradient norm at 1.0 unless told otherwise. Automatic optimization clips
    through the Trainer's ``gradient_clip_val``; the online methods optimize by hand, where Lightning
    refuses that key, and clip with their own ``max_grad_norm``."""
    parsed = yaml.safe_load((REPO / "configs" / config).read_text())
    method = _method_class(parsed)
    trainer = parsed["trainer"]
    if issubclass(method, OnlineMethod):
        default = inspect.signature(OnlineMethod.__init__).parameters["max_grad_norm"].default
        assert parsed["model"]["init_args"].get("max_grad_norm", default) == 1.0
        assert "gradient_clip_val" not in trainer
    else:
        assert trainer.get("gradient_clip_val") == 1.0, f"{config}: trainer.gradient_clip_val is not 1.0"
        assert trainer.get("gradient_clip_algorithm", "norm") == "norm"


class GradientNorm(pl.Callback):
    """The global norm of the gradient before Lightning clips it (it clips after this hook)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


def test_dpo_config_steps_with_a_huge_gradient_clipped_to_norm_1(tmp_path):
    # At the first step the policy is its reference, so DPO's gradient is beta/2 x the log-ratio's: at
    # beta 1000 its norm is in the hundreds.
    cli = build_cli(["--config", "configs/dpo.yaml", "--model.init_args.beta", "1000",
                     "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
                     "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    norm = GradientNorm()
    cli.trainer.callbacks = [norm]  # nothing to checkpoint, export or report after one step
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(norm.norms) == 1 and norm.norms[0] > 10
    # AdamW's first moment after one step is (1 - beta1) x the gradient it stepped with: that gradient had norm 1.
    optimizer = cli.trainer.optimizers[0]
    beta1 = optimizer.param_groups[0]["betas"][0]
    stepped = [state["exp_avg"] / (1 - beta1) for state in optimizer.state.values()]
    assert len(stepped) == sum(len(g["params"]) for g in optimizer.param_groups)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in stepped])).item()
    assert total == pytest.approx(1.0, rel=1e-4)
