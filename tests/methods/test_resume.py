"""Resuming: every method continues from the ``last.ckpt`` a run leaves (``max_steps`` reached, SIGTERM,
Ctrl-C) exactly as if it had never stopped; a killed or failed checkpoint write keeps the previous one."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.methods import (
    CPO, DPO, GKD, GRPO, KTO, PPO, RLOO, SFT, AtomicCheckpointIO, BestOfN, CheckpointWriteError, OnlineDPO,
    RewardModeling, ResumableCheckpoint, SimPO,
)
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import SamplingConfig

from tests.methods.online_helpers import make_online, saved_random_adapter
from tests.paths import REPO, TOY_BASE, TOY_DATA, TOY_TEACHER


def _bank(**kwargs) -> BankSpec:
    # LoRA dropout makes the RNG state part of what a resume must restore (kept on: disable_dropout is the default).
    return BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8, dropout=0.1), disable_dropout=False, **kwargs)


def _offline(cls, data_cls, rows):
    def build():
        return cls(bank=_bank(), learning_rate=3e-3), data_cls(f"{TOY_DATA}/{rows}", batch_size=8, max_length=64, seed=3)
    return build


def _online(cls, *, dropout: bool = False, **kwargs):
    """``cls`` on short rollouts; LoRA dropout on with ``dropout`` (off by default, as ``disable_dropout`` has it:
    the update's forward is then the rollout's, ``OnlineMethod.fuses_behaviour_pass``)."""
    def build():
        options = {**dict(update_epochs=1, num_mini_batches=1, num_samples_per_prompt=2, max_new_tokens=4), **kwargs}
        method = make_online(cls, **options)
        method.bank_spec.lora.dropout = 0.1
        method.bank_spec.disable_dropout = not dropout
        return method, PromptDataModule(f"{TOY_DATA}/prompt_val.jsonl", batch_size=2, max_length=32, seed=3)
    return build


def _gkd():
    method = GKD(bank=_bank(teacher=TeacherSpec(model=TOY_TEACHER)), lmbda=0.5, learning_rate=3e-3,
                 sampling=SamplingConfig(max_new_tokens=4))
    return method, SFTDataModule(f"{TOY_DATA}/sft_val.jsonl", batch_size=8, max_length=64, seed=3)


#: Every method, on a tiny run whose epoch is longer than the steps taken (so the stops are mid-epoch).
METHODS = {
    "dpo": _offline(DPO, PreferenceDataModule, "preference_val.jsonl"),
    "simpo": _offline(SimPO, PreferenceDataModule, "preference_val.jsonl"),
    "cpo": _offline(CPO, PreferenceDataModule, "preference_val.jsonl"),
    "sft": _offline(SFT, SFTDataModule, "sft_val.jsonl"),
    "reward": _offline(RewardModeling, PreferenceDataModule, "preference_val.jsonl"),
    "kto": _offline(partial(KTO, desirable_weight=2.1), UnpairedDataModule, "unpaired_val.jsonl"),  # 31:65 rows
    # PPO with the adaptive KL controller and reward normalisation: both travel in the checkpoint.
    "ppo": _online(PPO, adaptive_kl=True, kl_coef=0.05, kl_target=0.1, kl_horizon=100),
    "rloo": _online(RLOO),
    "grpo": _online(GRPO),
    "best_of_n": _online(BestOfN),
    "online_dpo": _online(OnlineDPO),
    "gkd": _gkd,
}


#: Settings of one method whose resume has a case of its own below (not run by the parametrized tests).
VARIANTS = {
    # TR-DPO: the reference adapter moves toward the policy at every step, after the step.
    "tr_dpo": _offline(partial(DPO, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
                       PreferenceDataModule, "preference_val.jsonl"),
    # Full fine-tuning with the reference's log-probs computed once, before step 1: no frozen copy of the base
    # exists, so a resumed run can only read them from its checkpoint (the policy it holds is no reference).
    "dpo_full_precomputed": lambda: (
        DPO(bank=_bank(train_mode="full"), learning_rate=1e-3, precompute_ref_logps=True),
        PreferenceDataModule(f"{TOY_DATA}/preference_val.jsonl", batch_size=8, max_length=64, seed=3)),
    # 4 optimizer steps a rollout (2 passes x 2 mini-batches, 2 micro-batches each), over reshuffled rows.
    "grpo_update": _online(GRPO, dropout=True, update_epochs=2, num_mini_batches=2, gradient_accumulation_steps=2),
}


def fit(name, root, max_steps, *, ckpt_path=None, callbacks=(), every_n_train_steps=None, seed=0, **kwargs):
    """One run of method ``name`` (seeded with ``seed``), checkpointing into ``root``; its trainable tensors at the end."""
    pl.seed_everything(seed)
    method, data = (METHODS | VARIANTS)[name]()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0, max_steps=max_steps,
        callbacks=[ResumableCheckpoint(dirpath=root, every_n_train_steps=every_n_train_steps), *callbacks],
        plugins=[AtomicCheckpointIO()], **kwargs,
    )
    trainer.fit(method, data, ckpt_path=ckpt_path)
    trainable = set(method.bank.trainable_names())
    return {n: p.detach().clone() for n, p in method.bank.named_parameters() if n in trainable}


def assert_same(resumed, straight):
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process when step ``step`` starts: the signal lands mid-step."""

    def __init__(self, step: int, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


# Online methods here take one optimizer step per rollout; N = 2 steps, 2N = 4, all inside the first epoch.
N = 2
QUICK = ["dpo", "grpo"]


def check_max_steps_then_signal(name, tmp_path, signals):
    straight = fit(name, tmp_path / "straight", 2 * N)
    # Stopped by max_steps: last.ckpt is written at the epoch's (cut) end.
    fit(name, tmp_path / "a", N)
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["global_step"] == N
    assert_same(fit(name, tmp_path / "a" / "resumed", 2 * N, ckpt_path=tmp_path / "a" / "last.ckpt"), straight)
    for signum in signals:
        # Stopped by a signal during step 1 (mid-epoch): the step finishes, last.ckpt holds it, exit status 0.
        root = tmp_path / signal.Signals(signum).name
        with pytest.raises(SystemExit) as stopped:
            fit(name, root, 2 * N, callbacks=[SignalAt(1, signum)])
        assert stopped.value.code == 0
        assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == 2
        assert_same(fit(name, root / "resumed", 2 * N, ckpt_path=root / "last.ckpt"), straight)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_from_last_ckpt_after_max_steps_equals_the_straight_run(name, tmp_path):
    check_max_steps_then_signal(name, tmp_path, [signal.SIGTERM] if name in QUICK else [])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(METHODS) - set(QUICK)))
def test_resume_after_sigterm_and_ctrl_c_equals_the_straight_run(name, tmp_path):
    check_max_steps_then_signal(name, tmp_path, [signal.SIGTERM, signal.SIGINT])


@pytest.mark.parametrize("name", QUICK)
def test_resume_at_an_epoch_boundary_equals_the_straight_run(name, tmp_path):
    # Epochs of N batches: the first run stops exactly at the end of epoch 0, the resumed one trains epoch 1.
    straight = fit(name, tmp_path / "straight", 2 * N, limit_train_batches=N)
    fit(name, tmp_path / "a", N, limit_train_batches=N)
    resumed = fit(name, tmp_path / "a" / "resumed", 2 * N, ckpt_path=tmp_path / "a" / "last.ckpt",
                  limit_train_batches=N)
    assert_same(resumed, straight)


# -- checkpoint writes ---------------------------------------------------------------------------------

#: Runs DPO with a checkpoint every 2 steps and SIGKILLs itself halfway through writing the second
#: last.ckpt (step 4), as a preempted or OOM-killed job dies: no cleanup runs.
DIE_WHILE_WRITING = """
import io, os, signal, sys
from pathlib import Path
import torch
from tests.methods.test_resume import fit
root = Path(sys.argv[1])
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if ".last.ckpt." in getattr(f, "name", "") and (root / "last.ckpt").exists():
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = save
fit("dpo", root, 6, every_n_train_steps=2)
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert list(root.glob(".last.ckpt.*.tmp")), "the write was not under way when the process died"
    from lit_rlhf.methods.checkpoints import find_last_checkpoint

    assert find_last_checkpoint(tmp_path) == root / "last.ckpt"  # the half-written file is not a candidate
    assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = fit("dpo", tmp_path / "resumed", 2 * N, ckpt_path=root / "last.ckpt", every_n_train_steps=2)
    assert_same(resumed, fit("dpo", tmp_path / "straight", 2 * N))


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".last.ckpt." in getattr(f, "name", "") and (tmp_path / "last.ckpt").exists():
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError, match="the disk is full; the previous checkpoint there is unchanged"):
        fit("dpo", tmp_path, 2 * N, every_n_train_steps=1)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


# -- the command line ------------------------------------------------------------------------------------


def test_cli_resumes_from_last_and_says_when_there_is_nothing_to_do(tmp_path, capsys, monkeypatch):
    from lit_rlhf.cli import main

    monkeypatch.setattr(sys, "argv", ["lit-rlhf"])

    def run(max_steps, *extra):
        main(["fit", "--config", "configs/dpo.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.warmup_steps", "0",  # a smoke run shorter than the config's warmup
              "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", *extra])
        return capsys.readouterr().err

    run(2)
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 2
    # A resumed run logs into a new version folder; `last` finds the newest last.ckpt of any version.
    assert f"--ckpt_path last: {first}" in run(4, "--ckpt_path", "last")
    second = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(second, weights_only=True)["global_step"] == 4
    before = sorted(tmp_path.rglob("*"))
    err = run(4, "--ckpt_path", "last")
    assert f"--ckpt_path last: {second}" in err
    assert "nothing to do: the run reached max_steps=4; raise it to continue" in err
    assert sorted(tmp_path.rglob("*")) == before, "resuming a finished run wrote something"


class StopAfterFirstBatch(pl.Callback):
    """``trainer.should_stop`` after the first batch, as ``max_time``'s Timer sets it at a batch's end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            trainer.should_stop = True


def test_a_stop_mid_gradient_accumulation_waits_for_the_end_of_the_window(tmp_path):
    # accumulate_grad_batches=2: the stop comes on the window's first micro-batch. The checkpoint cannot hold
    # the accumulated gradient, so the run finishes the window (one optimizer step) before it saves and stops.
    straight = fit("dpo", tmp_path / "straight", 2, accumulate_grad_batches=2)
    with pytest.raises(SystemExit):
        fit("dpo", tmp_path / "signal", 2, callbacks=[SignalAt(0)], accumulate_grad_batches=2)
    fit("dpo", tmp_path / "should_stop", 2, callbacks=[StopAfterFirstBatch()], accumulate_grad_batches=2)
    for root in (tmp_path / "signal", tmp_path / "should_stop"):
        saved = torch.load(root / "last.ckpt", weights_only=True)
        assert saved["global_step"] == 1, root.name
        assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2, root.name
        assert_same(fit("dpo", root / "resumed", 2, ckpt_path=root / "last.ckpt", accumulate_grad_batches=2), straight)


def test_a_run_resumed_under_another_seed_samples_what_the_straight_run_sampled(tmp_path):
    # A CLI run seeded at random (seed_everything: true) draws a new seed each time it starts: the rollouts'
    # sampling seed is the interrupted run's, from the checkpoint.
    straight = fit("grpo", tmp_path / "straight", 2)
    fit("grpo", tmp_path / "a", 1)
    assert_same(fit("grpo", tmp_path / "a" / "resumed", 2, ckpt_path=tmp_path / "a" / "last.ckpt", seed=1), straight)


# The package silences this at import (checkpoints.py), which pytest's per-test warning filters undo.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization and every_n_train_steps")
def test_every_n_train_steps_saves_when_a_rollout_passes_a_multiple_of_n(tmp_path):
    # Three optimizer steps a rollout, a checkpoint every 2: global_step goes 3, 6, 9, passing 2, 4|6, 8.
    pl.seed_everything(0)
    method = make_online(GRPO, update_epochs=3, num_mini_batches=1, num_samples_per_prompt=2, max_new_tokens=4)
    data = PromptDataModule(f"{TOY_DATA}/prompt_val.jsonl", batch_size=2, max_length=32, seed=3)
    every_2 = ResumableCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, save_last=False)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, max_steps=9, callbacks=[every_2]).fit(method, data)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt",
                                                               "epoch=0-step=9.ckpt"]


def test_tr_dpo_stopped_at_a_sync_step_resumes_with_the_synced_reference(tmp_path):
    # A checkpoint callback saves before the module's on_train_batch_end, where the step's sync happens.
    straight = fit("tr_dpo", tmp_path / "straight", 2 * N)
    with pytest.raises(SystemExit):
        fit("tr_dpo", tmp_path / "a", 2 * N, callbacks=[SignalAt(1)])
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["tr_dpo_reference"]["last_sync_step"] == 2
    assert_same(fit("tr_dpo", tmp_path / "a" / "resumed", 2 * N, ckpt_path=tmp_path / "a" / "last.ckpt"), straight)


class SignalAtOptimizerStep(pl.Callback):
    """Sends SIGTERM to this process before optimizer step ``step + 1``: inside an online method's update."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_inside_an_online_update_stops_after_the_rollouts_last_step(tmp_path):
    # At step 2 of the first rollout's 4: the update's remaining steps run, then the rollout is saved whole.
    straight = fit("grpo_update", tmp_path / "straight", 8)
    with pytest.raises(SystemExit):
        fit("grpo_update", tmp_path / "a", 8, callbacks=[SignalAtOptimizerStep(1)])
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert_same(fit("grpo_update", tmp_path / "a" / "resumed", 8, ckpt_path=tmp_path / "a" / "last.ckpt"), straight)


def test_a_run_from_a_loaded_adapter_resumes_with_that_adapter_as_its_reference(tmp_path, monkeypatch):
    # The reference is a frozen copy of the adapter loaded at the start (an SFT stage's output), rebuilt from its
    # path by the resumed run: not the policy the checkpoint holds, which would change every later DPO step.
    start = saved_random_adapter(tmp_path / "sft", "policy")

    def build():
        return (DPO(bank=_bank(adapters=[AdapterSpec("policy", path=start)]), learning_rate=3e-3),
                PreferenceDataModule(f"{TOY_DATA}/preference_val.jsonl", batch_size=8, max_length=64, seed=3))

    monkeypatch.setitem(VARIANTS, "dpo_from_sft", build)
    straight = fit("dpo_from_sft", tmp_path / "straight", 2 * N)
    fit("dpo_from_sft", tmp_path / "a", N)
    assert_same(fit("dpo_from_sft", tmp_path / "a" / "resumed", 2 * N, ckpt_path=tmp_path / "a" / "last.ckpt"), straight)


def test_full_fine_tuning_with_a_precomputed_reference_resumes_exactly(tmp_path):
    straight = fit("dpo_full_precomputed", tmp_path / "straight", 2 * N)
    fit("dpo_full_precomputed", tmp_path / "a", N)
    assert_same(fit("dpo_full_precomputed", tmp_path / "a" / "resumed", 2 * N, ckpt_path=tmp_path / "a" / "last.ckpt"),
                straight)


def test_last_finds_a_sharded_checkpoint_directory_once_its_save_completed(tmp_path):
    """Under FSDP ``last.ckpt`` is a directory of shards with Lightning's meta.pt written after them: the newest
    complete one is found; one without meta.pt (a save cut short) is not a candidate."""
    from lit_rlhf.methods.checkpoints import find_last_checkpoint

    def checkpoint(version: int, *, sharded: bool, complete: bool = True) -> Path:
        path = tmp_path / f"version_{version}" / "last.ckpt"
        if not sharded:
            path.parent.mkdir()
            path.write_bytes(b"one file")
        else:
            path.mkdir(parents=True)
            (path / "__0_0.distcp").write_bytes(b"shard")
            if complete:
                (path / "meta.pt").write_bytes(b"loops")
        os.utime(path / "meta.pt" if sharded and complete else path, ns=(version * 10**9, version * 10**9))
        return path

    checkpoint(0, sharded=False)
    newest = checkpoint(1, sharded=True)
    cut_short = checkpoint(2, sharded=True, complete=False)
    os.utime(cut_short, ns=(3 * 10**9, 3 * 10**9))
    assert find_last_checkpoint(tmp_path) == newest


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_sharded_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """FSDP (``FSDP2Strategy``, one process here) wrote a sharded ``last.ckpt`` into the directory already there:
    a save killed after its shards, before its meta.pt, left the new shards under the previous meta.pt, found
    complete and loaded mixed (step 2's loops, step 3's weights). It is written whole beside, then renamed in."""
    from lit_rlhf.methods.checkpoints import consolidated_checkpoint, find_last_checkpoint
    from lit_rlhf.strategies import FSDP2Strategy

    strategy, last = FSDP2Strategy(), tmp_path / "last.ckpt"

    def save(step: int) -> None:
        strategy.save_checkpoint({"state_dict": {"w": torch.full((3,), float(step))}, "optimizer_states": [],
                                  "global_step": step}, last)

    def found() -> tuple[Path, int, list[float]]:
        path = find_last_checkpoint(tmp_path)
        whole = consolidated_checkpoint(path)
        return path.name, whole["global_step"], whole["state_dict"]["w"].tolist()

    save(1)
    save(2)
    assert found() == ("last.ckpt", 2, [2.0] * 3) and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    real_save, real_rename = torch.save, os.rename

    def killed_before_meta(obj, f, *args, **kwargs):
        if str(f).endswith("meta.pt"):
            raise KeyboardInterrupt  # the kill: every shard is written, meta.pt is not
        real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_before_meta)
        with pytest.raises(KeyboardInterrupt):
            save(3)
    assert found() == ("last.ckpt", 2, [2.0] * 3)

    def killed_between_renames(source, destination):
        if Path(destination) == last:
            raise KeyboardInterrupt  # the previous checkpoint is moved aside, the new one not yet in place
        real_rename(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", killed_between_renames)
        with pytest.raises(KeyboardInterrupt):
            save(4)
    assert not last.exists() and found() == ("last.ckpt.next", 4, [4.0] * 3)
    save(5)
    assert found() == ("last.ckpt", 5, [5.0] * 3) and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
