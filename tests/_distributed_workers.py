"""Two-rank gloo workers for tests/test_distributed_audit.py, in a module of light imports: each spawned
rank imports the module of its function, and the test module's (Lightning, transformers) cost seconds."""

import socket
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_rlhf.distributed import global_mean_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(worker, out, start_method: str = "spawn", timeout: float = 240) -> list[dict]:
    """What each of two gloo ranks running ``worker(rank, port, out)`` saved as ``out/rank<r>.pt``, in rank
    order. ``fork`` skips the seconds of imports a spawned rank pays, for workers that need no fresh process.

    Raises:
        TimeoutError: where the ranks are not done after ``timeout`` seconds (a collective entered by one rank
            only waits for ever): they are killed, and the test fails instead of hanging.
    """
    ranks = mp.start_processes(worker, args=(free_port(), str(out)), nprocs=2, start_method=start_method, join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"{worker.__name__} on two ranks was not done after {timeout} s")
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def as_lightning_rank(rank: int, port: int) -> None:
    """Make this process rank ``rank`` of a two-process job Lightning's DDP takes as launched (it launches
    nothing: LOCAL_RANK says so), on one thread."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def token_mean_inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(5, 3)  # five items (tokens): rank 0 holds one, rank 1 four


def rollout_inputs() -> SimpleNamespace:
    """A rollout of 4 rows (2 per rank) with two reward sources, as ``OnlineMethod.rollout_metrics`` reads it."""
    return SimpleNamespace(scores=torch.tensor([1.0, 2.0, 3.0, 10.0]), response_lengths=torch.tensor([2, 4, 6, 20]),
                           ended=torch.tensor([True, True, False, False]),
                           per_source={"a": torch.tensor([0.0, 1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 1.0, 1.0, 7.0])})


def token_mean_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: a token mean over its share of ``token_mean_inputs`` (``global_mean_loss``),
    with DDP's gradient average."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        items = token_mean_inputs()[:1] if rank == 0 else token_mean_inputs()[1:]
        weight = torch.ones(3, requires_grad=True)
        loss, mean = global_mean_loss((items @ weight).sum(), torch.tensor(items.shape[0]))
        loss.backward()
        dist.all_reduce(weight.grad)  # DDP's gradient average
        torch.save({"grad": weight.grad / 2, "mean": mean}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rollout_metrics_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``OnlineMethod.global_rollout_metrics`` of its half of ``rollout_inputs``."""
    from lit_rlhf.methods.online import OnlineMethod  # seconds of imports: only in the ranks that need it

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        whole, share = rollout_inputs(), slice(2 * rank, 2 * rank + 2)
        mine = SimpleNamespace(scores=whole.scores[share], per_source={n: v[share] for n, v in whole.per_source.items()},
                               rollout=SimpleNamespace(response_lengths=whole.response_lengths[share],
                                                       ended=whole.ended[share]))
        method = SimpleNamespace(rollout_count=1, device="cpu")
        method.rollout_metrics = partial(OnlineMethod.rollout_metrics, method)
        metrics = OnlineMethod.global_rollout_metrics(method, mine, None)
        torch.save({"metrics": metrics}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the training-step metrics of the offline methods, logged over every rank's rows ---------------------

#: Rows of one global batch per method, and the share of each of two ranks: unequal, so a mean of the
#: ranks' means differs from the mean over the rows; rank 0's one KTO row is desirable only.
TRAINING_SHARES = (slice(0, 1), slice(1, 5))


def _rows(batch: dict, share: slice, rows: int) -> dict:
    """``share`` of a collated batch's ``rows`` examples; a preference batch stacks chosen over rejected."""
    def take(value):
        if len(value) == 2 * rows:  # chosen rows, then rejected rows
            return torch.cat([value[:rows][share], value[rows:][share]]) if torch.is_tensor(value) else \
                value[:rows][share] + value[rows:][share]
        return value[share] if len(value) == rows else value

    return {key: take(value) for key, value in batch.items()}


def training_step_logs(share: slice | None) -> dict[str, dict[str, float]]:
    """What ``training_step`` of DPO, KTO, RewardModeling and SFT logs on ``share`` of one global batch of 5
    rows (all of it for ``None``), the LoRA weights moved off zero alike in every process."""
    from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
    from lit_rlhf.methods import DPO, KTO, SFT, RewardModeling
    from lit_rlhf.models import BankSpec, LoraSpec

    from tests.paths import TOY_BASE, TOY_DATA

    def toy(data_class, file, **kwargs):
        return lambda: data_class(str(TOY_DATA / file), max_length=64, **kwargs)

    cases = {"dpo": (DPO, toy(PreferenceDataModule, "preference_train.jsonl")),
             "kto": (KTO, toy(UnpairedDataModule, "unpaired_train.jsonl")),
             "reward": (RewardModeling, toy(PreferenceDataModule, "preference_train.jsonl")),
             "sft": (SFT, toy(SFTDataModule, "sft_train.jsonl", packing=False))}
    logs = {}
    for name, (method_class, data) in cases.items():
        torch.manual_seed(0)
        method = method_class(bank=BankSpec(model=str(TOY_BASE), lora=LoraSpec(r=4, alpha=8)))
        method.configure_model()
        with torch.no_grad():
            for param_name, param in method.bank.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.1)
        data = data().prepare(method.tokenizer)
        examples = data.train_examples
        if name == "kto":  # three desirable rows, then two undesirable ones
            examples = [e for e in examples if e["label"]][:3] + [e for e in examples if not e["label"]][:2]
        batch = data.collator(examples[:5])
        logged = logs[name] = {}

        def log(name, value, logged=logged, **kwargs):  # a torchmetrics Metric logs its value
            logged[name] = float(torch.as_tensor(value.compute() if hasattr(value, "compute") else value).detach())

        method.log = log
        method.training_step(batch if share is None else _rows(batch, share, 5), 0)
    return logs


def training_step_logs_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``training_step_logs`` of its share of the global batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save({"logs": training_step_logs(TRAINING_SHARES[rank])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the online methods' update metrics, logged over every rank's micro-batches ---------------------------


def update_metrics_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: one GRPO and one PPO rollout under Lightning's DDP (gloo), each rank sampling its
    own rows. Saves, per method, what the rank logged, the metrics of every micro-batch it computed, and its
    rollout metrics (as ``rollout_metrics`` returned them) with its number of rows."""
    import lightning.pytorch as pl

    from lit_rlhf.methods import GRPO, PPO

    from tests.methods.online_helpers import make_online, prompts, trainer

    as_lightning_rank(rank, port)
    saved = {}
    for name, method_class in (("grpo", GRPO), ("ppo", PPO)):
        pl.seed_everything(0)
        method = make_online(method_class, max_new_tokens=4, num_samples_per_prompt=2, update_epochs=2,
                             num_mini_batches=2)
        micro_batches = []

        def recording(batch, policy_loss=method.policy_loss, micro_batches=micro_batches):
            loss, metrics = policy_loss(batch)
            micro_batches.append({k: float(v) for k, v in metrics.items()})
            return loss, metrics

        rollouts = []

        def rollout(scored, targets, rollout_metrics=method.rollout_metrics, rollouts=rollouts):
            metrics = rollout_metrics(scored, targets)
            rollouts.append(({k: float(v) for k, v in metrics.items()}, scored.scores.shape[0]))
            return metrics

        method.policy_loss, method.rollout_metrics = recording, rollout
        fit = trainer(rollouts=1, devices=2, strategy="ddp")
        fit.fit(method, datamodule=prompts(batch_size=2))
        saved[name] = {"logged": {k: float(v) for k, v in fit.callback_metrics.items()},
                       "micro_batches": micro_batches, "rollout": rollouts[0]}
    torch.save(saved, f"{out}/rank{rank}.pt")


# -- validation metrics: every validation row once, as one process counts them ---------------------------

#: Validation rows per method, in batches of 3: one process reads 3 + 3 + 1 (KTO 3 + 3 + 3), which two ranks
#: cannot share evenly; Lightning's sampler repeated a row to even them.
VALIDATION_ROWS = {"sft": 7, "dpo": 7, "reward": 7, "kto": 9}


def write_validation_rows(out) -> None:
    """The first ``VALIDATION_ROWS`` rows of each toy validation file, under ``out``."""
    from tests.paths import TOY_DATA

    files = {"sft": "sft_val.jsonl", "dpo": "preference_val.jsonl", "reward": "preference_val.jsonl",
             "kto": "unpaired_val.jsonl"}
    for name, file in files.items():
        lines = (TOY_DATA / file).read_text().splitlines()[: VALIDATION_ROWS[name]]
        (Path(out) / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def validation_logs(out, **trainer_options) -> dict[str, dict[str, float]]:
    """What ``trainer.validate`` logs for SFT, DPO, the reward model and KTO on the rows of
    ``write_validation_rows``, their LoRA weights moved off zero alike in every process."""
    from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
    from lit_rlhf.methods import DPO, KTO, SFT, RewardModeling
    from lit_rlhf.models import BankSpec, LoraSpec

    from tests.methods.online_helpers import lora_off_zero
    from tests.paths import TOY_BASE

    cases = {"sft": (SFT, SFTDataModule), "dpo": (DPO, PreferenceDataModule), "reward": (RewardModeling, PreferenceDataModule),
             "kto": (KTO, UnpairedDataModule)}
    logs = {}
    for name, (method_class, data_class) in cases.items():
        torch.manual_seed(0)  # LoRA A's draw
        method = method_class(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)))
        method.configure_model()
        lora_off_zero(method.bank, 0.1)
        rows = str(Path(out) / f"{name}.jsonl")
        logs[name] = validated(method, data_class(rows, val=rows, batch_size=3, max_length=64), **trainer_options)
    return logs


def validated(method, data, **trainer_options) -> dict[str, float]:
    """What ``trainer.validate`` of ``method`` on ``data`` logs, quietly."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_options)
    return {k: float(v) for k, v in trainer.validate(method, data, verbose=False)[0].items()}


def validation_logs_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``validation_logs`` under Lightning's DDP (gloo)."""
    as_lightning_rank(rank, port)
    torch.save({"logs": validation_logs(out, devices=2, strategy="ddp")}, f"{out}/rank{rank}.pt")


# -- the learning-rate schedule of a data-parallel run -----------------------------------------------------


def learning_rates(kind: str = "linear", *, callbacks=(), ckpt_path=None, **trainer_options) -> list[float]:
    """The learning rate of every optimizer step of an SFT fit with ``kind`` decay after 1 warmup step (2 epochs of
    5 batches, ``limit_train_batches``, per rank, in windows of 3), then the one after the last step; from
    ``ckpt_path`` when given."""
    import lightning.pytorch as pl

    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.methods import SFT
    from lit_rlhf.models import BankSpec, LoraSpec

    from tests.paths import TOY_BASE, TOY_DATA

    lrs = []

    class Seen(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    method = SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8)), learning_rate=0.1, warmup_steps=1,
                 lr_scheduler=kind)
    data = SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=64)
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                   enable_model_summary=False, max_epochs=2, limit_train_batches=5, accumulate_grad_batches=3,
                   limit_val_batches=0, callbacks=[Seen(), *callbacks])
    trainer = pl.Trainer(**options | trainer_options)
    trainer.fit(method, data, ckpt_path=ckpt_path)
    return lrs + [trainer.optimizers[0].param_groups[0]["lr"]]


def learning_rates_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``learning_rates`` under Lightning's DDP (gloo)."""
    as_lightning_rank(rank, port)
    torch.save({"lrs": learning_rates(devices=2, strategy="ddp")}, f"{out}/rank{rank}.pt")


# -- validation where one rank's batches hold no loss tokens ------------------------------------------------


def first_row_without_loss_tokens(collator, first: dict):
    """``collator`` whose batches holding the example ``first`` have no loss tokens (an all-zero completion mask)."""
    def collate(examples):
        batch = collator(examples)
        if first in examples:
            batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
        return batch

    return collate


def token_mean_validation_logs(out, **trainer_options) -> dict[str, dict[str, float]]:
    """What ``trainer.validate`` logs for SFT and GKD on 4 toy validation rows in batches of 2, the batch of the
    first row without loss tokens: on two ranks, rank 0 has none and rank 1 has some."""
    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.methods import GKD, SFT
    from lit_rlhf.models import BankSpec, LoraSpec
    from lit_rlhf.models.spec import TeacherSpec

    from tests.methods.online_helpers import lora_off_zero
    from tests.paths import TOY_BASE, TOY_DATA, TOY_TEACHER

    rows = Path(out) / "token_mean_val.jsonl"
    if not rows.exists():  # forked ranks share the parent's file
        rows.write_text("\n".join((TOY_DATA / "sft_val.jsonl").read_text().splitlines()[:4]) + "\n")
    cases = {"sft": SFT(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8))),
             "gkd": GKD(bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8), teacher=TeacherSpec(model=TOY_TEACHER)))}
    logs = {}
    for name, method in cases.items():
        torch.manual_seed(0)
        method.configure_model()
        lora_off_zero(method.bank, 0.1)
        data = SFTDataModule(str(rows), val=str(rows), batch_size=2, max_length=64).prepare(method.tokenizer)
        data.collator = first_row_without_loss_tokens(data.collator, data.val_examples[0])
        logs[name] = validated(method, data, **trainer_options)
    return logs


def token_mean_validation_logs_on_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: ``token_mean_validation_logs`` under Lightning's DDP (gloo)."""
    as_lightning_rank(rank, port)
    torch.save({"logs": token_mean_validation_logs(out, devices=2, strategy="ddp")}, f"{out}/rank{rank}.pt")
