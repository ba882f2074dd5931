"""Checkpoints a run can always resume from: written atomically, written whenever training stops
(``max_steps``, ``max_epochs``, SIGTERM, Ctrl-C), and found again by ``--ckpt_path last``.

Every shipped config adds ``AtomicCheckpointIO`` (``trainer.plugins``) and a ``ResumableCheckpoint``
(``trainer.callbacks``) that writes every N optimizer steps.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.models.saving import fsync_directory
from lit_rlhf.strategies import STAGED_SUFFIX

# ModelCheckpoint warns, at every periodic save of a manually optimized method, that the state saved
# is the one after the optimizer step: for a resume that is the step boundary it needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file that was there before is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, fsync, then one rename.

    A run killed mid-write, or a full disk, leaves the previous checkpoint of that name intact
    and loadable; the temporary file is removed. Remote paths (``s3://``...) go through
    Lightning's own writer. DeepSpeed writes checkpoint directories itself and does not use this.

    Reads a sharded (FSDP) checkpoint directory too, consolidated in this process's memory, so a run
    trained under ``fsdp.yaml`` resumes in one process or under DDP.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_directory(target.parent)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
                kept = "the previous checkpoint there is unchanged" if target.exists() else "nothing was written"
                raise CheckpointWriteError(
                    error.errno, f"could not write checkpoint {target}: {reason}; {kept}. Free space or choose "
                    "another default_root_dir, then resume with --ckpt_path last"
                ) from error
            raise

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" not in str(path) and (Path(path) / _METADATA_FILENAME).is_file():
            return consolidated_checkpoint(Path(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def consolidated_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint directory (Lightning's ``ModelParallelStrategy``: ``torch.distributed.checkpoint``
    shards and ``meta.pt``) as the one-file checkpoint of the same run, whole tensors on CPU."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(path)
    keys = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.removeprefix("optimizer_")))
    checkpoint["optimizer_states"] = [optimizer_state_by_position(checkpoint.pop(k)) for k in keys]
    return checkpoint


def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``torch.distributed.checkpoint.state_dict``'s, as FSDP
    saves it) keyed by position instead, as ``Optimizer.load_state_dict`` takes it: the same
    ``configure_optimizers`` lists each group's parameters in the same order in every process."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def resume_command(ckpt_path: Path) -> str:
    """The command that continues this run from ``ckpt_path``: this process's own ``lit-rlhf fit``
    command line with ``--ckpt_path`` replaced, or the ``Trainer.fit`` argument from Python."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "fit":
        return f"trainer.fit(model, datamodule, ckpt_path={str(ckpt_path)!r})"
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["lit-rlhf", *kept, "--ckpt_path", str(ckpt_path)])


class ResumableCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``last.ckpt`` always holds the state training stopped in.

    Everything ``ModelCheckpoint`` does (e.g. ``every_n_train_steps`` for periodic checkpoints),
    and ``last.ckpt`` is also written:

    - when training ends (``max_steps``, ``max_epochs``): ``ModelCheckpoint`` alone leaves the
      last periodic checkpoint there, up to N steps old;
    - on SIGTERM (preemption) or Ctrl-C (SIGINT): the optimizer step under way finishes (with
      ``accumulate_grad_batches``, every micro-batch of its window), ``last.ckpt`` is
      written, the command that resumes is printed, and the process exits with status 0. A second
      Ctrl-C aborts at once, without a checkpoint. A stop asked for through ``trainer.should_stop``
      (``max_time``, EarlyStopping) also waits for the window's optimizer step.

    Lightning on its own notices SIGTERM (``trainer.received_sigterm``) but exits after the step
    without saving, and turns Ctrl-C into an abort mid-step. This callback takes both signals
    while ``fit`` trains, makes every rank decide to stop at the same step (under DDP one rank
    may get the signal first), writes the checkpoint, and leaves through Lightning's own
    ``SIGTERMException`` exit (no export at ``on_fit_end``: the run is not finished).

    Args:
        save_last: as ``ModelCheckpoint``; on by default here.
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, *args, save_last: bool = True, **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self.received: Optional[str] = None
        self._step_before_batch = 0
        self._stop_held = False  # trainer.should_stop, held until the optimizer step ending the window
        self._previous_handlers: dict[int, Any] = {}

    # -- signal handlers, installed only while training ---------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.received, self._stop_held = None, False
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)

    # -- stopping ----------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._save_if_a_period_ended_inside_the_batch(trainer, pl_module)
        if self._hold_stop_mid_accumulation(trainer):
            # Every rank is at the same micro-batch, so every rank skips the decision below together.
            return
        if self._stop_held:
            trainer.should_stop, self._stop_held = True, False
        # Every rank takes part in the decision, then all save together (saving has a barrier).
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self._restore_handlers()
        self._save_last_now(trainer)
        if trainer.is_global_zero:
            print(f"stopped by {self.received or 'a signal to another rank'} after step {trainer.global_step}; "
                  f"checkpoint: {self.last_model_path}\nresume with:\n  {resume_command(Path(self.last_model_path))}",
                  file=sys.stderr, flush=True)
        raise SIGTERMException(0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._hold_stop_mid_accumulation(trainer)  # EarlyStopping after a validation inside the window

    def _hold_stop_mid_accumulation(self, trainer: pl.Trainer) -> bool:
        """Whether training is mid gradient accumulation (``accumulate_grad_batches > 1``); if so, a stop asked
        for (a signal; ``trainer.should_stop`` from ``max_time``'s Timer or EarlyStopping) waits for the
        optimizer step that ends the window. The checkpoint written at the stop cannot hold the accumulated
        gradients, and a run resumed from it would step on the window's later micro-batches alone."""
        if trainer.state.fn != TrainerFn.FITTING or not trainer.fit_loop.epoch_loop._should_accumulate():
            return False
        if trainer.should_stop:
            trainer.should_stop, self._stop_held = False, True
        return True

    def _save_if_a_period_ended_inside_the_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``every_n_train_steps`` for a manually optimized method, whose batch (a rollout) takes several
        optimizer steps: ``ModelCheckpoint`` saves only where ``global_step`` lands on a multiple of N, which
        with 3 steps a rollout and N = 20 is every 60 steps; this saves at the batch that passed one."""
        n = self._every_n_train_steps
        step = trainer.global_step
        if pl_module.automatic_optimization or n < 1 or step % n == 0 or step // n == self._step_before_batch // n:
            return  # ModelCheckpoint's own case, or no multiple of N passed in this batch
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True  # as ModelCheckpoint: saved after the next validation
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_now(trainer)
        super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed CLI run writes into a new version folder by design; the old folder's top-k
        # bookkeeping stays with it, which ModelCheckpoint would warn about on every resume.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            super().load_state_dict(state_dict)

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # this step is saved already
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# -- finding checkpoints again -----------------------------------------------------------------------


def find_last_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest ``last*.ckpt`` under ``root`` (any ``version_N/checkpoints`` folder), or ``None``: a file, or
    a sharded (FSDP) checkpoint directory whose save completed, under its name or still under the name it was
    written to (``FSDP2Strategy.save_checkpoint``: a kill before its rename)."""
    found = [*Path(root).rglob("last*.ckpt"), *(p for p in Path(root).rglob(f"last*.ckpt{STAGED_SUFFIX}") if p.is_dir())]
    written = {p: at for p in found if (at := _written_at(p)) is not None}
    return max(written, key=written.get) if written else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint file or a sharded checkpoint directory whose save completed."""
    return _written_at(Path(path)) is not None


def _written_at(checkpoint: Path) -> Optional[int]:
    """When ``checkpoint`` was last written, or ``None`` when it is not a complete checkpoint."""
    if checkpoint.is_file():
        return checkpoint.stat().st_mtime_ns
    # Lightning writes a sharded checkpoint's meta.pt after every rank's shards.
    meta = checkpoint / _METADATA_FILENAME
    return meta.stat().st_mtime_ns if meta.is_file() else None


def finished_message(ckpt_path: str | os.PathLike, max_steps: int, max_epochs: Optional[int]) -> Optional[str]:
    """Why resuming from ``ckpt_path`` would train nothing under these limits, or ``None``."""
    if Path(ckpt_path).is_dir():
        # A sharded (FSDP) checkpoint keeps the step and loops in meta.pt; a DeepSpeed one: Lightning reads it.
        ckpt_path = Path(ckpt_path) / _METADATA_FILENAME
        if not ckpt_path.is_file():
            return None
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    if max_steps is not None and 0 <= max_steps <= checkpoint["global_step"]:
        return f"nothing to do: the run reached max_steps={max_steps}; raise it to continue"
    fit = checkpoint["loops"]["fit_loop"]
    epoch = fit["epoch_progress"]["current"]
    epochs = epoch["completed"]
    if epoch["started"] > epoch["processed"] and fit["epoch_loop.batch_progress"]["is_last_batch"]:
        epochs += 1  # written after the epoch's last step, before Lightning counted the epoch
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        return f"nothing to do: the run reached max_epochs={max_epochs}; raise it to continue"
    return None
