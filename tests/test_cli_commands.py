"""The commands around a run: help, clean errors, generate, chat, evaluate, report, model cards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch.utilities
import pytest
from PIL import Image
from transformers import AutoModelForCausalLM

from lit_rlhf import inference
from lit_rlhf.cli import COMMANDS, console, main
from lit_rlhf.data import DataError
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec

from tests.paths import REPO
# warmup 0: the shipped configs warm up over more steps than these smoke runs take.
QUICK = ["--model.init_args.warmup_steps", "0", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false"]
EVERY_COMMAND = ["fit", "validate", "test", "export", "best-of-n", "generate", "chat", "evaluate", "report"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    """The log directory of a 3-step DPO fit (export and report callbacks of the shipped config)."""
    root = tmp_path_factory.mktemp("dpo")
    said = []  # the lines `lit-rlhf fit` itself logs at its end, kept in fit_output.txt beside the run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        # Its own rank_zero_info (imported when the CLI is built), not Lightning's logger, whose level and
        # handlers other tests and libraries set.
        mp.setattr(lightning.pytorch.utilities, "rank_zero_info", said.append)
        main(["fit", "--config", "configs/dpo.yaml", "--trainer.default_root_dir", str(root), *QUICK,
              "--trainer.log_every_n_steps", "1"])
    (root / "fit_output.txt").write_text("\n".join(said))
    return root / "lightning_logs" / "version_0"


def _assert_pngs(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.png"))
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()  # a truncated or non-PNG file raises
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 150
    return names


# -- one CLI -----------------------------------------------------------------------------------------


def test_help_lists_every_subcommand_with_a_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert list(COMMANDS) == EVERY_COMMAND
    for name in EVERY_COMMAND:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split()) > 3, f"no description for {name}: {line!r}"


@pytest.mark.parametrize("command", EVERY_COMMAND)
def test_every_subcommand_help_names_itself(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: lit-rlhf") and f" {command}" in usage, usage


# -- clean errors ------------------------------------------------------------------------------------


def _bad_row_file(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the movie was", "chosen": "good .", "rejected": "bad ."}\n'
                   '{"prompt": "the car was", "chosen": "fun .", "rejected": "fun ."}\n')
    return bad


def _failing_fit(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Arguments of a ``fit`` that must fail before training, and the message it must print."""
    args = ["fit", "--config", "configs/dpo.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    if case == "bad row":
        bad = _bad_row_file(tmp_path)
        return args + ["--data.init_args.train", str(bad), "--data.init_args.val", "null"], \
            f"{bad}:2: field 'chosen': is identical to 'rejected'"
    if case == "impossible config":
        return ["fit", "--config", "configs/grpo.yaml", "--model.init_args.num_samples_per_prompt", "1",
                "--trainer.default_root_dir", str(tmp_path / "run")], "lit-rlhf: error: GRPO"
    if case == "missing file":
        return args + ["--data.init_args.train", str(tmp_path / "nope.jsonl")], \
            f"lit-rlhf: error: config key 'data.init_args.train': {tmp_path / 'nope.jsonl'}: no such file or directory"
    return args + ["--model.init_args.betta", "0.2"], \
        ("lit-rlhf: error: config key 'model.init_args.betta': lit_rlhf.methods.DPO has no option 'betta'; "
         "did you mean 'beta'?")


@pytest.mark.parametrize("case", ["bad row", "missing file", "typo key", "impossible config"])
def test_user_errors_exit_1_with_the_message_only(tmp_path, capsys, case):
    args, expected = _failing_fit(tmp_path, case)
    with pytest.raises(SystemExit) as info:
        console(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert expected in err and "lit-rlhf: error: " in err
    assert "Traceback" not in err and "usage:" not in err  # one message, not a traceback or a usage dump
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def _config_with(tmp_path: Path, old: str, new: str) -> tuple[Path, int]:
    """configs/dpo.yaml with the line holding ``old`` edited to hold ``new``, and that line's number."""
    lines = (REPO / "configs" / "dpo.yaml").read_text().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if line.startswith(old))
    lines[number - 1] = lines[number - 1].replace(old, new)
    config = tmp_path / "edited.yaml"
    config.write_text("".join(lines))
    return config, number


@pytest.mark.parametrize("old, new, expected", [
    ("    beta:", "    betta:",
     "config key 'model.init_args.betta': lit_rlhf.methods.DPO has no option 'betta'; did you mean 'beta'?"),
    ("        r: 8", "        rr: 8",
     "config key 'model.init_args.bank.lora.rr' does not exist; did you mean 'model.init_args.bank.lora.r'?"),
    ("  max_epochs:", "  max_epochz:", "config key 'trainer.max_epochz' does not exist; did you mean 'trainer.max_epochs'?"),
    ("    beta: 1.0", "    beta: one", "config key 'model.init_args.beta': expected a float, got 'one'"),
    ("    train: assets/toy/data/preference_train", "    train: assets/toy/data/preference_trian",
     "config key 'data.init_args.train': assets/toy/data/preference_trian.jsonl: no such file or directory"),
], ids=["method option", "nested field", "trainer option", "wrong type", "missing data file"])
def test_a_bad_key_or_value_in_a_config_file_names_its_file_line_and_key(tmp_path, capsys, old, new, expected):
    config, line = _config_with(tmp_path, old, new)
    with pytest.raises(SystemExit):
        console(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert capsys.readouterr().err.strip() == f"lit-rlhf: error: {config}:{line}: {expected}"
    assert not (tmp_path / "run").exists()  # refused before the Trainer wrote anything


def test_typos_on_the_command_line_get_the_closest_key(capsys):
    with pytest.raises(SystemExit):
        console(["fit", "--config", "configs/dpo.yaml", "--trainer.max_epochz", "2"])
    assert "config key 'trainer.max_epochz' does not exist; did you mean 'trainer.max_epochs'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        console(["fit", "--config", "configs/dpo.yaml", "--model.init_args.bank.lora.alpah", "3"])
    assert capsys.readouterr().err.strip() == ("lit-rlhf: error: config key 'model.init_args.bank.lora.alpah' does not "
                                               "exist; did you mean 'model.init_args.bank.lora.alpha'?")
    with pytest.raises(SystemExit):
        console(["fit", "--config", "configs/nope.yaml"])
    assert capsys.readouterr().err.strip() == f"lit-rlhf: error: --config {REPO / 'configs/nope.yaml'}: no such file"


def test_the_lit_rlhf_process_exits_1_without_a_traceback(tmp_path):
    args, expected = _failing_fit(tmp_path, "typo key")
    result = subprocess.run([sys.executable, "-m", "lit_rlhf.cli", *args], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip() == expected


def test_debug_lets_the_traceback_through(tmp_path, monkeypatch, capsys):
    bad = _bad_row_file(tmp_path)
    args = ["fit", "--config", "configs/dpo.yaml", "--data.init_args.train", str(bad), "--data.init_args.val", "null",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        console(args)
    assert info.value.code == 1 and "field 'chosen'" in capsys.readouterr().err
    with pytest.raises(DataError):
        console(["--debug", *args])
    monkeypatch.setenv("LIT_RLHF_DEBUG", "1")
    with pytest.raises(DataError):
        console(args)


# -- after fit: report and model card ------------------------------------------------------------------


def test_fit_ends_by_naming_where_its_outputs_are(dpo_run):
    said = (dpo_run.parents[1] / "fit_output.txt").read_text().splitlines()
    assert f"last checkpoint -> {dpo_run / 'checkpoints' / 'last.ckpt'} (continue: --ckpt_path last)" in said


@pytest.mark.report_pngs
def test_fit_writes_a_report_and_an_adapter_model_card(dpo_run):
    assert "loss.png" in _assert_pngs(dpo_run / "report")
    summary = (dpo_run / "report" / "summary.md").read_text()
    assert "lit_rlhf.methods.DPO" in summary and "| loss |" in summary and "![loss](loss.png)" in summary
    card = (dpo_run / "export" / "adapter" / "README.md").read_text()
    for expected in ("base_model: assets/toy/base", "library_name: peft", "DPO",
                     "assets/toy/data/preference_train.jsonl",
                     "| beta | `1.0` |", "## Final metrics", "| loss |", "PeftModel.from_pretrained(base, "):
        assert expected in card, expected


@pytest.mark.report_pngs
def test_report_command_writes_valid_pngs(dpo_run, tmp_path, capsys):
    main(["report", str(dpo_run), "--out", str(tmp_path)])
    assert {"loss.png", "rewards.png"} <= set(_assert_pngs(tmp_path))
    assert (tmp_path / "summary.md").exists()


def test_export_command_writes_a_merged_model_with_a_card_that_loads(dpo_run, tmp_path, capsys):
    out = tmp_path / "merged"
    main(["export", "--config", "configs/dpo.yaml", "--ckpt_path", str(dpo_run / "checkpoints" / "last.ckpt"),
          "--out", str(out), "--merged", "true"])
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "## Final metrics" in card and "last.ckpt" in card
    AutoModelForCausalLM.from_pretrained(out)  # the card does not stop plain transformers from loading it


# -- generate, chat, evaluate --------------------------------------------------------------------------


def test_generate_writes_one_jsonl_row_per_prompt(dpo_run, tmp_path, capsys):
    prompts = ["the movie was", "i think the car is", "my review of the food :"]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    main(["generate", str(dpo_run), "--prompts", str(source), "--out", str(out), "--max_new_tokens", "6"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["completion"], str) for r in rows)

    main(["generate", str(dpo_run / "export" / "adapter"), "--prompt", "the show was", "--prompt", "the team was",
          "--n", "3", "--do_sample", "true"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the show was", "the team was"]
    assert all(len(r["completions"]) == 3 for r in rows)


def test_chat_renders_the_history_and_resets(dpo_run, monkeypatch):
    seen = []
    real = inference.prompt_batches

    def spy(policy, prompts, **kwargs):
        seen.append(list(prompts[0]))  # a copy: chat appends the reply to its history afterwards
        return real(policy, prompts, **kwargs)

    monkeypatch.setattr(inference, "prompt_batches", spy)
    stdout = io.StringIO()
    inference.chat_main([str(dpo_run), "--max_new_tokens", "5"],
                        stdin=io.StringIO("the movie was\nand the food ?\n/reset\nhello\n"), stdout=stdout)
    replies = [ln for ln in stdout.getvalue().splitlines() if ln.startswith("assistant> ")]
    assert len(replies) == 3
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][1]["content"] == replies[0].removeprefix("assistant> ")
    assert seen[2] == [{"role": "user", "content": "hello"}]


def test_evaluate_an_untrained_adapter_equals_its_reference(tmp_path, capsys):
    """A fresh LoRA adapter (B = 0) is its reference: same samples, KL 0, win rate one half."""
    adapter = AdapterBank(BankSpec(model="assets/toy/base"), require=[AdapterSpec("policy")]).save_adapter(
        "policy", tmp_path / "adapter")
    out = tmp_path / "eval.json"
    main(["evaluate", str(adapter), "--out", str(out), "--samples", "2"])
    result = json.loads(out.read_text())
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result["win_rate"] == 0.5
    assert result["policy"]["reward"] == result["reference"]["reward"]
    assert result["prompts"] == 12 and result["prompts_from"] == "the toy task's held-out prompts"
    assert "win rate vs reference" in capsys.readouterr().out


def test_evaluate_a_trained_run_writes_its_json(dpo_run, capsys):
    main(["evaluate", str(dpo_run), "--samples", "2"])
    result = json.loads((dpo_run / "evaluation.json").read_text())
    assert result["kl"] > 0.0
    for role in ("policy", "reference"):
        assert {"reward", "toy_score", "toy_score_greedy", "response_length"} <= set(result[role])
    assert 0.0 <= result["win_rate"] <= 1.0


def raising_reward(prompts, completions):
    raise ZeroDivisionError("the judge crashed")


def test_a_reward_function_fault_names_the_function_and_leaves_no_run_behind(tmp_path, capsys):
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        console(["fit", "--config", "configs/grpo.yaml", "--trainer.default_root_dir", str(root),
                 "--model.init_args.rewards",
                 '[{"kind": "function", "function": "tests.test_cli_commands:raising_reward"}]'])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "tests.test_cli_commands:raising_reward" in err and "Traceback" not in err
    # Nothing trained: no checkpoint, no event file, no export, no empty version directory.
    assert not [p for p in root.rglob("*") if p.is_file()], sorted(root.rglob("*"))
