"""Running `lit-rlhf fit` on 1 or 2 CPU processes (gloo) and reading back every rank's trainable weights.

The callbacks below are loaded by the child processes (the repository root is on their PYTHONPATH).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lit_rlhf.rollout import Rollout, truncate_at_stop

from tests.paths import REPO


class DumpTrainable(pl.Callback):
    """At the end of fit, every rank writes ``rank{r}.pt`` under ``$LIT_RLHF_DUMP``: its trainable
    tensors (whole, gathered from FSDP shards), the optimizer steps taken, and under DDP how many
    gradient all-reduces (buckets) ran."""

    def __init__(self) -> None:
        self.allreduce_calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            def counting_hook(state, bucket):
                self.allreduce_calls += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)

    def on_train_end(self, trainer, pl_module) -> None:
        from lit_rlhf.strategies import gather_trainable

        state = gather_trainable(pl_module.bank)
        out = Path(os.environ["LIT_RLHF_DUMP"])
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "steps": trainer.global_step, "allreduce_calls": self.allreduce_calls},
                   out / f"rank{trainer.global_rank}.pt")


class PromptSeededEngine:
    """The method's engine, generating each prompt's group (its ``k`` consecutive rows) in a ``generate``
    call of its own, without the batch's left padding, seeded from the prompt's token ids and the
    rollout count: a prompt's samples are then the same whichever rank holds it and whatever prompts
    share its batch, so one process sees the samples that two ranks drew between them."""

    def __init__(self, inner, method) -> None:
        self.inner, self.method = inner, method

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling) -> Rollout:
        k = self.method.num_samples_per_prompt
        responses = []
        for start in range(0, prompt_ids.shape[0], k):
            kept = prompt_mask[start].bool()  # the k rows are one prompt: the same columns are padding
            ids, mask = prompt_ids[start : start + k, kept], prompt_mask[start : start + k, kept]
            torch.manual_seed(zlib.crc32(repr((self.method.rollout_count, ids[0].tolist())).encode()))
            responses.append(self.inner.generate(bank, adapter, ids, mask, sampling).response_ids)
        width = max(r.shape[1] for r in responses)
        response = torch.cat([F.pad(r, (0, width - r.shape[1]), value=sampling.pad_token_id) for r in responses])
        return truncate_at_stop(prompt_ids, prompt_mask, response, sampling.stop_token_ids, sampling.pad_token_id)


class SeedSamplesByPrompt(pl.Callback):
    """Puts ``PromptSeededEngine`` around an online method's engine."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.engine = PromptSeededEngine(pl_module.engine, pl_module)


def fit_command(config: str, root: Path, *, devices: int, strategy: str | None, steps: int, args=(),
                callbacks: Sequence[str] = (), merged: bool = False) -> list[str]:
    """The command line of one fit; ``callbacks``: class paths of more callbacks (no arguments); ``merged``:
    export a merged model beside the adapter at the end of fit."""
    overlay = root / "overlay.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  limit_val_batches: 0\n"
        "  callbacks:\n"
        "    - class_path: tests._scale_helpers.DumpTrainable\n"
        + "".join(f"    - class_path: {path}\n" for path in callbacks) +
        "    - class_path: lit_rlhf.methods.ExportOnFitEnd\n"
        f"      init_args: {{merged: {str(merged).lower()}}}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {root / 'ckpt'}, save_last: true, every_n_train_steps: 1}}\n"
    )
    command = [sys.executable, "-m", "lit_rlhf.cli", "fit", "--config", f"configs/{config}.yaml"]
    if strategy is not None:
        command += ["--config", f"configs/strategy/{strategy}.yaml"]
    return command + ["--config", str(overlay), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                      "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *args]


def launch(command: list[str], dump: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", LIT_RLHF_DUMP=str(dump), PYTHONPATH=str(REPO))
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def run_all(commands: dict[str, tuple[list[str], Path]]) -> dict[str, list[dict]]:
    """Run the commands concurrently; ``{name: [rank0 dump, rank1 dump, ...]}``."""
    processes = {name: launch(command, dump) for name, (command, dump) in commands.items()}
    for process in processes.values():
        finish(process)
    return {name: [torch.load(p, weights_only=True) for p in sorted(dump.glob("rank*.pt"))]
            for name, (_, dump) in commands.items()}


def assert_same_weights(a: dict, b: dict, *, atol: float, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
