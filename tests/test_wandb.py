"""W&B end to end, offline: an online run logs its metrics, its config and its sample tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")

from lit_rlhf.cli import main  # noqa: E402


def test_wandb_offline_run_writes_metrics_config_and_sample_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                         "init_args": {"project": "lit-rlhf-test", "save_dir": str(tmp_path), "offline": True}})
    main(["fit", "--config", "configs/grpo.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.logger", logger, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--model.init_args.log_samples_every_n_rollouts", "1"])
    run = wandb.run
    try:
        # What the run received: the hyperparameters and the last value of each metric.
        assert run.config["learning_rate"] == 0.003 and run.config["loss_type"] == "grpo"
        summary = dict(run.summary)
        assert {"objective/scores", "loss/policy", "lr"} <= set(summary), sorted(summary)
    finally:
        wandb.finish()
    # What reached the disk: the offline run's log (protobuf records, keys as plain bytes) and the table.
    # wandb's service process writes them; finish() can return before its last records are flushed.
    keys = (b"objective/scores", b"loss/policy", b"learning_rate", b"lit_rlhf.toy:reward")
    run_dir, written = flushed_offline_run(tmp_path / "wandb", keys)
    for key in keys:
        assert key in written, key
    tables = list(run_dir.glob("files/media/table/samples_*.table.json"))
    assert tables, "no sample table"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "completion", "score"] and len(table["data"]) > 0


def flushed_offline_run(wandb_dir: Path, keys: tuple[bytes, ...], timeout: float = 30.0) -> tuple[Path, bytes]:
    """The one offline run's directory and its log's bytes, once every key is in them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = list(wandb_dir.glob("offline-run-*"))
        assert len(runs) <= 1, runs
        logs = list(runs[0].glob("run-*.wandb")) if runs else []
        written = logs[0].read_bytes() if logs else b""
        if all(key in written for key in keys) or time.monotonic() > deadline:
            assert runs and logs, list(wandb_dir.rglob("*"))
            return runs[0], written
        time.sleep(0.2)
