"""The end-to-end example (examples/pipeline.py, examples/pipeline.sh): it runs, writes what each
stage promises, PPO beats SFT on held-out prompts, and the shell commands still parse."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.cli import build_cli
from lit_rlhf.methods import SFT, ExportOnFitEnd, RewardModeling
from lit_rlhf.methods.ppo import PPO

from tests.paths import REPO, import_file

EXAMPLES = REPO / "examples"


def load_pipeline():
    return import_file(EXAMPLES / "pipeline.py", "examples_pipeline")


# Three convergence fits in a row (about 10 s); SFT's, Reward's and PPO's own run in the default suite.
@pytest.mark.slow
def test_pipeline_py_sft_reward_ppo_on_one_base(tmp_path):
    pipeline = load_pipeline()
    out = tmp_path / "pipeline"
    # A shorter budget than the defaults (reward 3 -> 2 epochs, PPO 4 -> 3 epochs, 8 samples per prompt).
    results = pipeline.main(["--out", str(out), "--reward-epochs", "2", "--ppo-epochs", "3", "--samples", "8",
                             "--verbose"])
    p = pipeline.paths(out)

    # SFT: the adapter and the merged model, loadable by plain transformers.
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (p["sft_merged"] / name).is_file(), name
    assert (p["sft_adapter"] / "adapter_config.json").is_file()

    # Reward: adapter + head + normalisation statistics, trained on the merged SFT model.
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "lit_rlhf.json"):
        assert (p["reward_adapter"] / name).is_file(), name
    meta = json.loads((p["reward_adapter"] / "lit_rlhf.json").read_text())
    assert meta["head"] == "score"
    assert meta["normalization"]["std"] > 0 and "mean" in meta["normalization"]
    config = json.loads((p["reward_adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(p["sft_merged"])

    # PPO: the policy adapter, on the same SFT base.
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (p["ppo_adapter"] / name).is_file(), name
    config = json.loads((p["ppo_adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(p["sft_merged"])
    assert json.loads(p["results"].read_text())["results"] == results

    # Alignment worked, measured by the ground truth on prompts no stage trained on.
    base, sft, ppo = results["base"], results["sft"], results["ppo"]
    assert sft["score_sampled"] > base["score_sampled"] + 0.2
    assert ppo["score_sampled"] > sft["score_sampled"] + 0.1
    assert ppo["score_greedy"] >= sft["score_greedy"] - 1e-6
    assert ppo["reward_model"] > sft["reward_model"]
    assert base["kl_to_reference"] is None
    assert 0.0 < ppo["kl_to_reference"] < 10.0
    assert 0.0 < sft["kl_to_reference"] < 10.0


def pipeline_sh_commands(out: Path) -> list[list[str]]:
    """The commands examples/pipeline.sh runs, as argv lists (DRY_RUN=1 prints them, %q-quoted)."""
    proc = subprocess.run(["bash", str(EXAMPLES / "pipeline.sh"), str(out)], env={**os.environ, "DRY_RUN": "1"},
                          capture_output=True, text=True, check=True, timeout=60)
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_pipeline_sh_commands_parse(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-rlhf"])  # LightningCLI warns when pytest's own argv is there too
    out = tmp_path / "pipeline"
    commands = pipeline_sh_commands(out)
    assert [c[:2] for c in commands] == [["lit-rlhf", "fit"]] * 3 + [["python", "examples/pipeline.py"]]

    clis = [build_cli(argv[2:], run=False) for argv in commands[:3]]
    sft, reward, ppo = (cli.model for cli in clis)
    assert isinstance(sft, SFT) and isinstance(reward, RewardModeling) and isinstance(ppo, PPO)
    merged = str(out / "sft/export/merged")

    exports = []
    for cli, stage in zip(clis, ("sft", "reward", "ppo")):
        assert cli.trainer.default_root_dir == str(out / stage)
        export = [c for c in cli.trainer.callbacks if isinstance(c, ExportOnFitEnd)]
        assert len(export) == 1 and export[0].dirpath == str(out / stage / "export")
        exports.append(export[0])
    assert exports[0].merged and not exports[1].merged

    # Reward and PPO sit on the merged SFT model; PPO reads the reward adapter from that same bank.
    assert sft.bank_spec.model == "assets/toy/base"
    assert reward.bank_spec.model == merged and ppo.bank_spec.model == merged
    adapters = {a.name: a for a in ppo.bank_spec.adapters}
    assert set(adapters) == {"policy", "value", "reward"}
    assert adapters["reward"].path == str(out / "reward/export/adapter")
    [source] = ppo.reward_specs
    assert (source.kind, source.adapter, source.normalize) == ("adapter", "reward", "saved")
    assert ppo.rewards.adapter_names == ["reward"]

    # The evaluation command's flags exist.
    args = load_pipeline().build_parser().parse_args(commands[3][2:])
    assert args.evaluate_only and args.out == str(out)

