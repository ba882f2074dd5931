"""The `lit-rlhf` command: every shipped config parses, runs, logs, checkpoints and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import build_cli, main
from lit_rlhf.data import DataError
from lit_rlhf.losses import sequence_logps

CONFIGS = sorted(Path("configs").glob("*.yaml")) if Path("configs").exists() else []
# warmup 0: the shipped configs warm up over more steps than these smoke runs take.
QUICK = ["--model.init_args.warmup_steps", "0", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_and_builds(config):
    cli = build_cli(["--config", f"configs/{config}"], run=False)
    assert cli.model.bank_spec.model
    assert cli.datamodule is not None


@pytest.fixture(scope="module")
def quick_fit(tmp_path_factory):
    """``quick_fit(config)``: the LightningCLI of a 3-step ``fit`` of ``configs/<config>.yaml``, run once for the
    module (the tests after it read the run and evaluate the model; none trains it further)."""
    runs = {}

    def fit(config: str):
        if config not in runs:
            root = tmp_path_factory.mktemp(config)
            runs[config] = build_cli(["fit", "--config", f"configs/{config}.yaml", "--trainer.default_root_dir", str(root),
                                      *QUICK])
        return runs[config]

    return fit


@pytest.mark.parametrize("config", ["dpo", "simpo", "cpo", "orpo"])
def test_preference_config_fits_logs_and_exports_a_peft_adapter(quick_fit, config):
    cli = quick_fit(config)
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (log_dir / "config.yaml").exists()
    assert list((log_dir / "checkpoints").glob("*.ckpt"))
    adapter_dir = log_dir / "export" / "adapter"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("assets/toy/base"), adapter_dir).eval()

    method, data = cli.model.eval(), cli.datamodule
    batch = data.collator(data.val_examples[:4])
    with torch.no_grad():
        expected = method.policy_pair_logps(batch)
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exported, _ = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    torch.testing.assert_close(exported, torch.cat([expected.chosen, expected.rejected]), atol=1e-5, rtol=1e-5)
    # Training moved the adapter: a LoRA B that is still zero would make this an empty check.
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained("assets/toy/base")(input_ids=batch["input_ids"]).logits
    assert (base_logits - logits).abs().max() > 1e-3


def test_export_command_writes_adapter_and_merged_model_from_a_checkpoint(quick_fit, tmp_path):
    cli = quick_fit("dpo")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    main(["export", "--config", "configs/dpo.yaml", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merged", "true"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = cli.datamodule.collator(cli.datamodule.val_examples[:2])
    with torch.no_grad():
        expected = cli.model.eval().bank.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_data_fails_before_training_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the movie was", "chosen": "good .", "rejected": "bad ."}\n'
                   '{"prompt": "the car was", "chosen": "fun .", "rejected": "fun ."}\n')
    root = tmp_path / "run"
    with pytest.raises(DataError, match=rf"{bad}:2: field 'chosen'"):
        main(["fit", "--config", "configs/dpo.yaml", "--data.init_args.train", str(bad),
              "--data.init_args.val", "null", "--trainer.default_root_dir", str(root)])
    assert not list(root.rglob("*.ckpt")) and not list(root.rglob("events.out.tfevents.*"))


def test_cli_overrides_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/dpo.yaml", "--model.init_args.beta", "0.25", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "beta: 0.25" in printed and "class_path: lit_rlhf.methods.DPO" in printed


def test_a_printed_config_builds_the_same_run_and_prints_itself(tmp_path, capsys):
    def printed(config) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    first = tmp_path / "printed.yaml"
    first.write_text(printed("configs/kto.yaml"))
    assert printed(first) == first.read_text()
    # Built as export and best-of-n build a run, from it as printed (fit's own keys, ckpt_path and
    # weights_only, included: a saved config.yaml holds them too).
    cli = build_cli(["--config", str(first)], run=False)
    assert type(cli.model).__name__ == "KTO" and cli.model.beta == 0.1 and cli.trainer.max_epochs == 3
    assert {type(c).__name__ for c in cli.trainer.callbacks} >= {"ResumableCheckpoint", "ReportOnFitEnd", "ExportOnFitEnd"}


# Slow (15 s each): the default suite keeps its two-process checks to the gloo collectives
# (tests/test_distributed.py: the helpers and the whitening, two ranks spawned once) and stays under 3 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("config", ["dpo", "ppo"])
def test_ddp_on_two_cpu_processes_fits_and_exports(tmp_path, config):
    """DDP (gloo) on this CPU: every rank takes part in the collectives through fit and export."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.cli", "fit", "--config", f"configs/{config}.yaml", "--trainer.strategy", "ddp",
         "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "export" / "adapter" / "adapter_config.json").exists()
