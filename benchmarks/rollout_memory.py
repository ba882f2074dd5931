"""Does memory grow across rollouts? Resident memory of a long online run, sampled every few rollouts.

An online method (GRPO by default; PPO, RLOO, best-of-n) trains on the toy prompts for
``--rollouts`` rollouts (one optimizer step each, several epochs over the prompts) with the
TensorBoard logger and the sample table on, as a user's run has them. The process's resident
set size (RSS, ``/proc/self/statm`` after ``gc.collect()``) is read after every ``--every``
rollouts; the report is RSS at the end over RSS at rollout ``--every`` (the first reading,
after warm-up). A leak (a list that keeps every rollout, logged tensors that keep their graph)
shows as a ratio that grows with ``--rollouts``.

    python benchmarks/rollout_memory.py [--method grpo --rollouts 200 --every 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_over_rollouts(method: str = "grpo", rollouts: int = 200, every: int = 20) -> dict[int, float]:
    """``{rollout: RSS in MiB}`` after every ``every`` rollouts of a toy run of ``method``."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.methods import GRPO, PPO, RLOO, BestOfN
    from lit_rlhf.models import BankSpec, LoraSpec
    from lit_rlhf.rollout import RewardSpec, SamplingConfig

    torch.set_num_threads(1)
    cls = {"grpo": GRPO, "ppo": PPO, "rloo": RLOO, "best_of_n": BestOfN}[method]
    readings: dict[int, float] = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.rollout_count % every == 0:
                readings[pl_module.rollout_count] = rss_mib()

    pl.seed_everything(0)
    method_ = cls(bank=BankSpec(model=str(REPO / "assets/toy/base"), lora=LoraSpec(r=8, alpha=16)),
                  rewards=[RewardSpec("function", function="lit_rlhf.toy:reward")], num_samples_per_prompt=4,
                  update_epochs=1, num_mini_batches=1, sampling=SamplingConfig(max_new_tokens=8),
                  log_samples_every_n_rollouts=5, learning_rate=1e-3)
    data = PromptDataModule(str(REPO / "assets/toy/data/prompt_train.jsonl"), batch_size=4, max_length=32)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=rollouts, max_epochs=-1, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, log_every_n_steps=1, callbacks=[Probe()],
                             logger=TensorBoardLogger(root), default_root_dir=root)
        trainer.fit(method_, data)
    return readings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="grpo", choices=["grpo", "ppo", "rloo", "best_of_n"])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    readings = rss_over_rollouts(args.method, args.rollouts, args.every)
    first, last = readings[args.every], readings[max(readings)]
    print(json.dumps({"method": args.method, "rss_mib": readings, "ratio_last_over_first": last / first}, indent=1))


if __name__ == "__main__":
    main()
