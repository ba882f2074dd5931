"""Two-process DDP (gloo, CPU) run that records, per rank, the state that must agree between ranks.

Run by ``test_ddp_sync.py`` as ``python tests/methods/ddp_sync_script.py OUT``; Lightning starts
the second rank by running this script again. Two fits share the process group:

1. KTO (automatic optimization): rank 1 alone sees a non-finite loss at step 1; each rank
   records the KL reference point and its own rows' log-ratios at every step.
2. PPO (manual optimization) with an adaptive KL coefficient and a running reward normaliser:
   rank 1 alone sees a non-finite loss in its second mini-batch; each rank records β, the
   normaliser's statistics and its own raw scores after every rollout.

Each rank writes ``OUT/rank{r}.pt``: the records and every trainable tensor after each fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_rlhf.data import PromptDataModule, UnpairedDataModule
from lit_rlhf.losses import kl_penalty
from lit_rlhf.methods.kto import KTO
from lit_rlhf.methods.ppo import PPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig

from tests.paths import TOY_BASE, TOY_DATA

KL_COEF, KL_TARGET, KL_HORIZON = 0.1, 0.015, 8  # a target near the first rollout's KL: its error is not clipped


def perturb_policy(method, scale: float) -> None:
    """Move the policy off the reference (the same on both ranks: same seed), so KL estimates are not 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in method.bank.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def trainable(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}


class ProbeKTO(KTO):
    def configure_model(self) -> None:
        super().configure_model()
        perturb_policy(self, 0.2)

    def completion_logps(self, batch, prefix=""):
        out = super().completion_logps(batch, prefix)
        if prefix == "kl_":
            self._kl_logps.append(out.logps.detach())  # policy first, then reference
        return out

    def compute_loss(self, batch):
        self._kl_logps = []
        loss, metrics = super().compute_loss(batch)
        if self.trainer.training:
            policy, reference = self._kl_logps
            self.record.append({"kl": float(metrics["kl"][0]), "local_logratio": (policy - reference).tolist()})
            if self.global_rank == 1 and self.global_step == 1:
                loss = loss * float("nan")
        return loss, metrics


class ProbePPO(PPO):
    def configure_model(self) -> None:
        super().configure_model()
        perturb_policy(self, 0.05)

    def policy_loss(self, batch):
        loss, metrics = super().policy_loss(batch)
        self.losses_seen += 1
        if self.global_rank == 1 and self.losses_seen == 2:
            loss = loss * float("nan")
        return loss, metrics

    def compute_advantages(self, scored):
        self.raw_scores = next(iter(scored.per_source.values())).tolist()
        self.local_kl = (kl_penalty(scored.old_logprobs, scored.ref_logprobs) * scored.rollout.response_mask).sum(1).tolist()
        return super().compute_advantages(scored)

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        normalizer = self.rewards.normalizers[0]
        self.record.append({"kl_coef": self.kl_controller.value, "local_kl": self.local_kl, "raw_scores": self.raw_scores,
                            "norm_mean": normalizer.mean, "norm_std": normalizer.std, "norm_count": normalizer.count})


def trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=steps,
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def main(out: Path) -> None:
    bank = BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8))
    pl.seed_everything(0)
    kto = ProbeKTO(bank=bank, learning_rate=1e-2, weight_decay=0.1, desirable_weight=1.5)
    kto.record = []
    fit = trainer(steps=3)
    fit.fit(kto, datamodule=UnpairedDataModule(str(TOY_DATA / "unpaired_train.jsonl"), batch_size=4, max_length=48))

    pl.seed_everything(0)
    ppo = ProbePPO(bank=bank, learning_rate=1e-2, rewards=[RewardSpec("function", function="lit_rlhf.toy:reward",
                                                                      normalize="running")],
                   sampling=SamplingConfig(max_new_tokens=6), num_samples_per_prompt=2, num_mini_batches=2,
                   adaptive_kl=True, kl_coef=KL_COEF, kl_target=KL_TARGET, kl_horizon=KL_HORIZON, log_samples_every_n_rollouts=0)
    ppo.record, ppo.losses_seen = [], 0
    fit = trainer(steps=2)
    fit.fit(ppo, datamodule=PromptDataModule(str(TOY_DATA / "prompt_train.jsonl"), batch_size=2, max_length=32))

    torch.save({"kto": kto.record, "kto_weights": trainable(kto), "kto_skipped": kto.skipped_nonfinite,
                "ppo": ppo.record, "ppo_weights": trainable(ppo), "ppo_skipped": ppo.skipped_nonfinite},
               out / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
