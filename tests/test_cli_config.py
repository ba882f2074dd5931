"""What a ``lit-rlhf`` command line builds: the run it asks for, whatever checkpoint, override or second
config it names (parsed and built in process; nothing trains here)."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import lightning.pytorch.utilities
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.cli import ConfigError, build_cli, console, load_checkpoint, main
from lit_rlhf.data import DataError


@pytest.fixture
def built_only(monkeypatch):
    """``build_cli([subcommand, ...])`` parses and builds as the command would, then stops before running."""
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: None)


@pytest.fixture(scope="module")
def dpo_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of configs/dpo.yaml's untrained run: its trainable tensors, and its hyperparameters as
    LightningCLI saves them (the class path with the init arguments)."""
    model = build_cli(["--config", "configs/dpo.yaml", "--trainer.logger", "false"], run=False).model
    assert model.hparams["_class_path"] == "lit_rlhf.methods.DPO"
    model.configure_model()
    checkpoint = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)  # keeps the trainable tensors, as a LoRA run's checkpoint holds
    path = tmp_path_factory.mktemp("dpo") / "checkpoints" / "last.ckpt"  # a run directory's layout
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_does_not_replace_the_configs_method_arguments(built_only, dpo_checkpoint, monkeypatch):
    """LightningCLI overwrites the config's model with the checkpoint's saved hyperparameters: an override
    (or a moved base model) was silently dropped. The config is the run; the differences are listed."""
    said = []  # what the CLI logs (its rank_zero_info is imported when it is built)
    monkeypatch.setattr(lightning.pytorch.utilities, "rank_zero_info", said.append)
    cli = build_cli(["validate", "--config", "configs/dpo.yaml", "--ckpt_path", str(dpo_checkpoint),
                     "--model.init_args.beta", "0.5", "--model.init_args.bank.lora.r", "4"])
    assert cli.model.beta == 0.5 and cli.model.bank_spec.lora.r == 4
    assert said == [f"--ckpt_path {dpo_checkpoint}: the config differs from the checkpoint's run; the config's values "
                    "are used:\n  model.init_args.bank.lora.r: 8 in the checkpoint, 4 in the config\n"
                    "  model.init_args.beta: 1.0 in the checkpoint, 0.5 in the config"]


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


def test_a_checkpoint_of_another_adapter_layout_is_refused(dpo_checkpoint):
    """Loading is not strict (the frozen base is not in a checkpoint): the LoRA tensors of modules the config
    does not adapt were dropped without a word, and export wrote a q_proj-only adapter of an all-linear run."""
    narrower = build_cli(["--config", "configs/dpo.yaml", "--model.init_args.bank.lora.target_modules", "[q_proj]",
                          "--trainer.logger", "false"], run=False).model
    with pytest.raises(ValueError, match=r"it holds 24 tensors this method does not have \(e.g. \['bank.model.base_"):
        load_checkpoint(narrower, dpo_checkpoint)
    same = build_cli(["--config", "configs/dpo.yaml", "--trainer.logger", "false"], run=False).model
    load_checkpoint(same, dpo_checkpoint)


def test_export_refuses_a_bad_flag_value_or_a_run_directory_for_a_checkpoint(dpo_checkpoint, capsys):
    export = ["export", "--config", "configs/dpo.yaml", "--out", "unused"]
    with pytest.raises(SystemExit) as info:  # `--merged maybe` exported the adapter only, as `false`
        main([*export, "--ckpt_path", str(dpo_checkpoint), "--merged", "maybe"])
    assert info.value.code == 2 and "argument --merged: expected true or false, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a traceback from torch.distributed.checkpoint
        main([*export, "--ckpt_path", str(dpo_checkpoint.parent.parent)])
    assert info.value.code == 2
    assert (f"argument --ckpt_path: {dpo_checkpoint.parent.parent}: not a checkpoint file or sharded checkpoint "
            f"directory (checkpoints under it: {dpo_checkpoint})") in capsys.readouterr().err


# runpy warns that the module it runs as __main__ is imported already: the very situation under test.
@pytest.mark.filterwarnings("ignore:'lit_rlhf.cli' found in sys.modules:RuntimeWarning")
def test_python_m_lit_rlhf_cli_prints_a_commands_config_error_in_one_line(monkeypatch, capsys):
    """Run as ``python -m lit_rlhf.cli`` (torchrun, SLURM), the file was ``__main__`` and the commands raised
    the ConfigError of a second copy, ``lit_rlhf.cli``: a traceback instead of the one line."""
    monkeypatch.setattr(sys, "argv", ["lit_rlhf.cli", "export", "--config", "nope.yaml", "--ckpt_path", "last",
                                      "--out", "unused"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("lit_rlhf.cli", run_name="__main__")
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().startswith("lit-rlhf: error: --config ")


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


# -- validate and test -------------------------------------------------------------------------------


def test_test_runs_the_data_test_split(tmp_path):
    # Untrained, the DPO policy is its reference: every pair's loss is -log sigmoid(0) = log 2.
    cli = build_cli(["test", "--config", "configs/dpo.yaml", "--data.init_args.test", "assets/toy/data/preference_val.jsonl",
                     "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.datamodule.test_examples and not cli.trainer.validating
    assert cli.trainer.callback_metrics["test/loss"].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("args, expected", [
    (["test", "--config", "configs/dpo.yaml"], "lit-rlhf test runs on the test split: set data.init_args.test"),
    (["test", "--config", "configs/grpo.yaml"], "GRPO has no test loop"),
    (["validate", "--config", "configs/dpo.yaml", "--ckpt_path", "last"], "--ckpt_path last: no last*.ckpt under"),
], ids=["no test split", "online method", "no last checkpoint"])
def test_validate_and_test_refuse_what_they_cannot_run_in_one_line(tmp_path, capsys, args, expected):
    """Before: a traceback from inside Lightning's loop, or (``--ckpt_path last`` with no checkpoint) the
    untrained model validated as if it were the run's."""
    with pytest.raises(SystemExit) as info:
        console([*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and expected in err and "Traceback" not in err


def test_a_bad_test_row_is_reported_before_the_loop(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"prompt": "the car was", "chosen": "fun .", "rejected": "fun ."}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: field 'chosen'"):
        build_cli(["test", "--config", "configs/dpo.yaml", "--data.init_args.test", str(bad), "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path)])


def test_fit_help_says_where_a_methods_options_are(capsys):
    """``fit --config X --help`` lists the Trainer's options only (the method is a subclass): it names the
    command that lists the method's, whose help documents the bank's fields too."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/dpo.yaml", "--help"])
    assert "--model.help DPO" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DPO"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.beta BETA strength of the implicit KL constraint" in out and "--model.init_args.bank.lora.r 16" in out


@pytest.mark.parametrize("config, method, option, here", [
    ("rloo", "RLOO", "beta", "model.init_args.kl_coef"),
    ("grpo", "GRPO", "num_generations", "model.init_args.num_samples_per_prompt"),
    ("dpo", "DPO", "max_length", "data.init_args.max_length"),
])
def test_a_trl_argument_name_points_to_its_name_here(capsys, config, method, option, here):
    with pytest.raises(SystemExit):
        console(["fit", "--config", f"configs/{config}.yaml", f"--model.init_args.{option}", "4"])
    assert capsys.readouterr().err.strip() == (f"lit-rlhf: error: config key 'model.init_args.{option}': "
                                               f"lit_rlhf.methods.{method} has no option '{option}'; TRL's {option} "
                                               f"is {here} here")
