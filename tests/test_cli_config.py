"""What a ``lit-rlhf`` command line builds: the run it asks for, whatever checkpoint, override or second
config it names (parsed and built in process; nothing trains here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.cli import ConfigError, build_cli, console, load_checkpoint


@pytest.fixture
def built_only(monkeypatch):
    """``build_cli([subcommand, ...])`` parses and builds as the command would, then stops before running."""
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: None)


@pytest.fixture(scope="module")
def dpo_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of configs/dpo.yaml's run as LightningCLI saves its hyperparameters (the class path
    with the init arguments); its tensors play no part in what is checked here."""
    model = build_cli(["--config", "configs/dpo.yaml", "--trainer.logger", "false"], run=False).model
    assert model.hparams["_class_path"] == "lit_rlhf.methods.DPO"
    path = tmp_path_factory.mktemp("dpo") / "last.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": {}}, path)
    return path


def test_a_checkpoint_does_not_replace_the_configs_method_arguments(built_only, dpo_checkpoint, caplog):
    """LightningCLI overwrites the config's model with the checkpoint's saved hyperparameters: an override
    (or a moved base model) was silently dropped. The config is the run; the differences are listed."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = build_cli(["validate", "--config", "configs/dpo.yaml", "--ckpt_path", str(dpo_checkpoint),
                         "--model.init_args.beta", "0.5", "--model.init_args.bank.lora.r", "4"])
    assert cli.model.beta == 0.5 and cli.model.bank_spec.lora.r == 4
    assert "model.init_args.beta: 1.0 in the checkpoint, 0.5 in the config" in caplog.text
    assert "model.init_args.bank.lora.r: 8 in the checkpoint, 4 in the config" in caplog.text


def test_a_checkpoint_of_another_method_is_refused(built_only, dpo_checkpoint, capsys):
    # Before, `validate --config configs/kto.yaml` with a DPO checkpoint silently validated DPO.
    with pytest.raises(SystemExit) as info:
        console(["validate", "--config", "configs/kto.yaml", "--ckpt_path", str(dpo_checkpoint)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"checkpoint {dpo_checkpoint} (--ckpt_path) is of a DPO run, but the config's model is KTO" in err
    assert "Traceback" not in err
    # export and best-of-n load a checkpoint into the config's method themselves.
    kto = build_cli(["--config", "configs/kto.yaml", "--trainer.logger", "false"], run=False).model
    with pytest.raises(ConfigError, match="is of a DPO run, but the config's model is KTO"):
        load_checkpoint(kto, dpo_checkpoint)


def test_deepspeed_preset_refuses_the_zero_arguments_its_config_replaces(capsys):
    """Lightning's ZeRO arguments build the DeepSpeed config that ``deepspeed_config`` replaces: they were
    accepted (and printed by --print_config: ``offload_optimizer: false`` under ``offload: true``) and ignored."""
    deepspeed = ["fit", "--config", "configs/dpo.yaml", "--config", "configs/strategy/deepspeed_zero3_offload.yaml"]
    with pytest.raises(SystemExit):
        console([*deepspeed, "--trainer.strategy.init_args.reduce_bucket_size", "5", "--print_config"])
    assert ("config key 'trainer.strategy.init_args.reduce_bucket_size': lit_rlhf.strategies.DeepSpeedZeRO has no "
            "option 'reduce_bucket_size'") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        console([*deepspeed, "--print_config"])
    printed = capsys.readouterr().out
    assert "offload: true" in printed and "offload_optimizer" not in printed and "timeout: 0:30:00" in printed
