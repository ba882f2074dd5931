"""Scaling out: strategy presets, what runs where, and data-parallel runs on two CPU processes (gloo).

What the multi-process tests prove, with 2 ranks of batch ``b`` against 1 process of batch ``2b``
(the same global batch: the sampler gives rank ``r`` rows ``r, r+2, ...`` of the one-process order):

- DPO and SFT under DDP and FSDP2 reach the one-process weights after N optimizer steps, within
  ``atol=1e-5, rtol=1e-4`` (float32; only the order of the gradient reduction differs); every rank
  holds the same weights. SFT's loss is a mean over the tokens of every rank (it would not match
  with per-rank token means).
- PPO and GRPO under DDP reach the one-process weights after N optimizer steps, same tolerance. Each
  rank samples with its own seed, so no one-process run would see the same samples: both runs
  sample through ``tests._scale_helpers.PromptSeededEngine`` (each prompt's group generated alone, seeded
  from its token ids), with ``num_mini_batches: 1`` (each rank shuffles its own mini-batches). This
  needs PPO's policy and value token means over the step's all-reduced token count and GRPO's
  ``scale_rewards: batch`` std over every rank (per-rank, both fail). Ranks hold identical weights
  after every step, and with ``gradient_accumulation_steps: 2`` gradients are all-reduced once per
  optimizer step (``no_sync`` on the first micro-batch).
- A run resumed from a DDP or an FSDP (sharded, ``torch.distributed.checkpoint``) checkpoint
  reaches the weights of the uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lit_rlhf.cli import build_cli, main
from lit_rlhf.distributed import rank_seed
from lit_rlhf.strategies import (
    FSDP2Strategy,
    ScaleError,
    check_scale_support,
    deepspeed_config,
    strategy_kind,
)

from tests._scale_helpers import assert_same_weights, fit_command, run_all
from tests.paths import REPO


@pytest.fixture(autouse=True)
def _cli_reads_only_its_args(monkeypatch):
    # LightningCLI warns when pytest's own command line is in sys.argv beside args=.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


METHODS = ["dpo", "sft", "reward", "kto", "ppo", "grpo", "rloo", "gkd"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# -- presets and the support table ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preset", ["ddp", "fsdp"])
def test_strategy_presets_compose_with_every_method_config(method, preset):
    cli = build_cli(["--config", f"configs/{method}.yaml", "--config", f"configs/strategy/{preset}.yaml"], run=False)
    kind, _ = strategy_kind(cli.trainer.strategy)
    assert kind == {"ddp": "ddp", "fsdp": "fsdp"}[preset]
    # The method's own settings survive the overlay.
    assert cli.model.bank_spec.model == "assets/toy/base"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_presets_are_refused_without_cuda_naming_ddp(preset):
    # The parser reports the strategy's ScaleError among the union's alternatives (a ValueError too).
    with pytest.raises(ValueError, match=r"(?s)DeepSpeed ZeRO-[23] runs on CUDA GPUs only.*configs/strategy/ddp.yaml"):
        build_cli(["--config", "configs/dpo.yaml", "--config", f"configs/strategy/{preset}.yaml"], run=False)


def test_fsdp2_strategy_shards_over_every_process():
    strategy = FSDP2Strategy()
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.num_nodes = 2
    # What setup_environment resolves before building the mesh (ModelParallelStrategy's "auto" would be num_nodes).
    assert strategy.num_nodes * strategy.num_processes == 8 and strategy._tensor_parallel_size == 1


@pytest.mark.parametrize(
    ("kind", "stage", "generates", "manual", "mode", "extra", "message"),
    [
        ("fsdp", None, True, True, "lora", {}, r"PPO with fsdp: a method that generates.*ddp.yaml.*deepspeed_zero2"),
        ("fsdp", None, False, False, "qlora", {}, r"train_mode 'qlora'.*DDP / ZeRO-2 for QLoRA"),
        ("fsdp", None, False, False, "full", {}, r"train_mode 'full'.*ZeRO-3"),
        ("fsdp1", None, False, False, "lora", {}, r"FSDP v1.*configs/strategy/fsdp.yaml"),
        ("deepspeed", 2, True, True, "lora", {"accelerator": "cpu"}, r"CUDA GPUs only.*ddp.yaml"),
        ("deepspeed", 2, True, True, "lora", {"gradient_accumulation_steps": 2, "accelerator": "cuda"},
         r"gradient_accumulation_steps 2.*gradient_accumulation_steps: 1"),
        ("deepspeed", 3, True, True, "lora", {"engine": "hf_static", "accelerator": "cuda"}, r"engine 'hf_static'.*engine: hf"),
        ("deepspeed", 3, False, False, "qlora", {"dtype": "bfloat16", "accelerator": "cuda"},
         r"stored as uint8; set bank.quant_storage: bfloat16"),
    ],
)
def test_unsupported_combinations_are_refused_naming_what_to_use(kind, stage, generates, manual, mode, extra, message):
    with pytest.raises(ScaleError, match=message):
        check_scale_support("PPO", kind=kind, stage=stage, generates=generates, manual_optimization=manual,
                            train_mode=mode, **extra)


@pytest.mark.parametrize(
    ("kind", "stage", "generates", "manual", "mode"),
    [("fsdp", None, False, False, "lora"), ("ddp", None, True, True, "qlora"), ("ddp", None, True, True, "full"),
     ("deepspeed", 2, True, True, "qlora"), ("deepspeed", 3, True, True, "full")],
)
def test_supported_combinations_pass(kind, stage, generates, manual, mode):
    check_scale_support("M", kind=kind, stage=stage, generates=generates, manual_optimization=manual,
                        train_mode=mode, engine="hf", accelerator="cuda")
    check_scale_support("M", kind="deepspeed", stage=3, generates=False, manual_optimization=False,
                        train_mode="qlora", accelerator="cuda", quant_storage="bfloat16", dtype="bfloat16")


def test_quant_storage_reaches_bitsandbytes():
    from lit_rlhf.models.loading import quantization_config
    from lit_rlhf.models.spec import BankSpec

    assert quantization_config(BankSpec(train_mode="qlora")).bnb_4bit_quant_storage == torch.uint8
    spec = BankSpec(train_mode="qlora", dtype="bfloat16", quant_storage="bfloat16")
    assert quantization_config(spec).bnb_4bit_quant_storage == torch.bfloat16


def test_online_method_under_fsdp_fails_in_setup_before_the_bank_loads():
    cli = build_cli(["--config", "configs/grpo.yaml", "--config", "configs/strategy/fsdp.yaml"], run=False)

    class FakeTrainer:
        strategy = cli.trainer.strategy
        accelerator = cli.trainer.accelerator

    cli.model._trainer = FakeTrainer()
    with pytest.raises(ScaleError, match="GRPO with fsdp"):
        cli.model.setup("fit")
    assert cli.model.bank is None


def test_deepspeed_config_stages_offload_and_clipping():
    two = deepspeed_config(2, gradient_clipping=1.0)
    assert two["zero_optimization"]["stage"] == 2 and two["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in two["zero_optimization"]
    three = deepspeed_config(3, offload=True)
    zero = three["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_config(2, offload=True)["zero_optimization"]
    # Lightning sets these from the Trainer and refuses them in the config.
    assert "gradient_accumulation_steps" not in three and "train_micro_batch_size_per_gpu" not in three
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        deepspeed_config(1)


def test_deepspeed_clipping_comes_from_max_grad_norm_in_manual_optimization():
    """Lightning's clip_gradients is a no-op under DeepSpeed: PPO's max_grad_norm must reach the engine."""
    from lit_rlhf.strategies import DeepSpeedZeRO

    cli = build_cli(["--config", "configs/ppo.yaml", "--model.init_args.max_grad_norm", "0.5"], run=False)
    strategy = object.__new__(DeepSpeedZeRO)  # without deepspeed installed: only the config logic is exercised
    strategy.config = deepspeed_config(2)
    # Lightning's DeepSpeedStrategy subclasses DDPStrategy: it must still be told apart.
    assert strategy_kind(strategy) == ("deepspeed", 2)
    strategy._lightning_module = cli.model
    cli.model._trainer = type("T", (), {"accumulate_grad_batches": 1, "gradient_clip_val": None})()
    strategy._auto_select_batch_size = lambda: 8
    strategy._format_batch_size_and_grad_accum_config()
    assert strategy.config["gradient_clipping"] == 0.5
    assert strategy.config["gradient_accumulation_steps"] == 1


def test_rank_seeds_differ_per_rank_and_rollout_and_repeat():
    seeds = {rank_seed(0, rank, step) for rank in range(8) for step in range(100)}
    assert len(seeds) == 800
    assert rank_seed(3, 1, 7) == rank_seed(3, 1, 7) != rank_seed(4, 1, 7)


# -- two processes against one ------------------------------------------------------------------------


def _compare_with_one_process(tmp_path, config, strategy, *, per_rank_batch, steps, args=(), callbacks=()):
    batch = "--data.init_args.batch_size"
    runs = run_all({
        "one": (fit_command(config, tmp_path / "one", devices=1, strategy=None, steps=steps, callbacks=callbacks,
                            args=[batch, str(2 * per_rank_batch), *args]), tmp_path / "one" / "dump"),
        "two": (fit_command(config, tmp_path / "two", devices=2, strategy=strategy, steps=steps, callbacks=callbacks,
                            args=[batch, str(per_rank_batch), *args]), tmp_path / "two" / "dump"),
    })
    (one,), (rank0, rank1) = runs["one"], runs["two"]
    assert one["steps"] == rank0["steps"] == rank1["steps"] == steps
    assert_same_weights(rank0["state"], rank1["state"], atol=0, rtol=0)
    assert_same_weights(rank0["state"], one["state"], **TOL)
    return one, rank0


@pytest.mark.slow  # three processes at once: the longest default test (55 s on 2 busy cores), slow as its siblings
def test_fsdp_dpo_on_two_processes_matches_one_process(tmp_path):
    one, _ = _compare_with_one_process(tmp_path, "dpo", "fsdp", per_rank_batch=4, steps=3)
    # The weights moved: equal initial weights would make the comparison empty.
    assert any(v.abs().max() > 0 for k, v in one["state"].items() if "lora_B" in k)
    # The sharded checkpoint is a directory with one file per rank; the adapter exported at the end of
    # fit (gathered, written by rank 0) and the one `lit-rlhf export` writes from that directory hold
    # the trained weights (LoRA B moved off zero).
    last = tmp_path / "two" / "ckpt" / "last.ckpt"
    assert len(list(last.glob("*.distcp"))) == 2
    main(["export", "--config", "configs/dpo.yaml", "--ckpt_path", str(last), "--out", str(tmp_path / "from_ckpt")])
    trained = sorted(round(float(v.norm()), 5) for v in one["state"].values())
    for adapter in (tmp_path / "two" / "export" / "adapter", tmp_path / "from_ckpt"):
        exported = load_file(str(adapter / "adapter_model.safetensors"))
        assert sorted(round(float(v.norm()), 5) for v in exported.values()) == pytest.approx(trained, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "strategy"), [("dpo", "ddp"), ("sft", "ddp"), ("sft", "fsdp")])
def test_two_processes_match_one_process(tmp_path, config, strategy):
    _compare_with_one_process(tmp_path, config, strategy, per_rank_batch=4, steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["grpo", "ppo"])
def test_online_two_processes_match_one_process(tmp_path, config):
    """GRPO and PPO under DDP reach the weights of one process holding both ranks' prompts (2 x 2 against
    1 x 4 prompts, two rollouts of two optimizer steps), within the tolerance of DPO.

    Each rank samples with its own seed, so both runs sample through ``PromptSeededEngine``: every
    prompt's group is generated alone, seeded from its token ids, the same on whichever rank holds it.
    ``num_mini_batches: 1`` and ``gradient_accumulation_steps: 1`` because each rank shuffles its own
    rows into mini-batches: with more, the mini-batches of two ranks together would hold other rows
    than the one process's. Everything else must be global, and is exercised: the clipped gradient
    norm (``max_grad_norm`` below the norm, so every step clips the all-reduced gradient); GRPO
    (``loss_type: grpo``, ``beta: 0.04``): group advantages (groups are whole on a rank) divided by the
    std of every rank's rewards (``scale_rewards: batch``; a per-rank std fails this test), the k3 KL
    term, the per-sequence mean over equal rows per rank; PPO: advantages whitened over every rank,
    and policy and value token means normalised by the step's all-reduced token count (per-rank
    token means fail this test: the ranks' responses have different lengths).
    """
    args = ["--model.init_args.num_mini_batches", "1", "--model.init_args.gradient_accumulation_steps", "1",
            "--model.init_args.max_grad_norm", "0.02"]  # below the gradient norm (about 0.1): every step clips
    if config == "grpo":
        args += ["--model.init_args.scale_rewards", "batch"]  # the one advantage piece that is not group-local
    # Two rollouts of update_epochs 2 optimizer steps each.
    one, _ = _compare_with_one_process(tmp_path, config, "ddp", per_rank_batch=2, steps=4, args=args,
                                       callbacks=["tests._scale_helpers.SeedSamplesByPrompt"])
    assert any(v.abs().max() > 0 for k, v in one["state"].items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ppo", "grpo"])
def test_online_ranks_stay_identical_and_all_reduce_once_per_step(tmp_path, config):
    runs = run_all({"two": (fit_command(config, tmp_path, devices=2, strategy="ddp", steps=4, args=[
        "--model.init_args.gradient_accumulation_steps", "2", "--data.init_args.batch_size", "4"]), tmp_path / "dump")})
    rank0, rank1 = runs["two"]
    assert rank0["steps"] == rank1["steps"] == 4
    assert_same_weights(rank0["state"], rank1["state"], atol=0, rtol=0)
    # One bucket (the LoRA tensors are small): one all-reduce per optimizer step, not one per micro-batch.
    assert rank0["allreduce_calls"] == rank0["steps"], rank0["allreduce_calls"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_from_a_data_parallel_checkpoint_continues_the_run(tmp_path, strategy):
    constant = ["--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0",
                "--data.init_args.batch_size", "4"]
    runs = run_all({
        "whole": (fit_command("dpo", tmp_path / "whole", devices=2, strategy=strategy, steps=4, args=constant),
                  tmp_path / "whole" / "dump"),
        "first": (fit_command("dpo", tmp_path / "part", devices=2, strategy=strategy, steps=2, args=constant),
                  tmp_path / "part" / "dump"),
    })
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    assert last.is_dir() == (strategy == "fsdp")
    resumed = run_all({"resumed": (fit_command("dpo", tmp_path / "resumed", devices=2, strategy=strategy, steps=4,
                                               args=[*constant, "--ckpt_path", str(last)]), tmp_path / "resumed" / "dump")})
    assert resumed["resumed"][0]["steps"] == 4
    assert_same_weights(resumed["resumed"][0]["state"], runs["whole"][0]["state"], **TOL)
    assert_same_weights(resumed["resumed"][1]["state"], runs["whole"][1]["state"], **TOL)


def test_one_optimizer_with_a_parameter_group_per_role():
    """DeepSpeed takes one optimizer: PPO's policy, value adapter and value head are groups of it."""
    cli = build_cli(["--config", "configs/ppo.yaml"], run=False)
    method = cli.model
    method.configure_model()
    groups = {g["name"]: g["params"] for g in method.parameter_groups()}
    assert set(groups) == {"policy", "value", "value.head"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in method.bank.trainable_parameters())
    assert all(p.requires_grad for params in groups.values() for p in params)


@pytest.mark.slow
def test_gpu_scale_dry_run_parses_every_run(tmp_path):
    """benchmarks/gpu_scale.sh up to where CUDA is needed: model config and every run's arguments."""
    done = subprocess.run(["bash", "benchmarks/gpu_scale.sh", "--dry-run", "--workdir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model: 0.45B parameters" in done.stderr
    assert done.stderr.count("ok: ") == 12
    assert (tmp_path / "llama-0.5b" / "config.json").exists()


@pytest.mark.slow  # two fits at once, then two resumes (about 90 s on 2 busy cores)
def test_fsdp_exports_and_checkpoint_are_those_of_one_process(tmp_path):
    """A LoRA run under FSDP exports, at the end of fit, the adapter and the merged model one process
    exports with the same global batch (every tensor, whole: not rank 0's shard); its sharded checkpoint
    resumes in one process (weights and Adam's moments consolidated) to the weights of the one-process
    run resumed from its own, and ``--ckpt_path last`` finds it."""
    from lit_rlhf.methods.checkpoints import find_last_checkpoint, finished_message

    batch = "--data.init_args.batch_size"
    runs = {name: (fit_command("dpo", tmp_path / name, devices=devices, strategy=strategy, steps=2, merged=True,
                               args=[batch, str(8 // devices)]), tmp_path / name / "dump")
            for name, devices, strategy in (("one", 1, None), ("fsdp", 2, "fsdp"))}
    run_all(runs)
    for export, weights in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        one, sharded = (load_file(str(tmp_path / name / "export" / export / weights)) for name in ("one", "fsdp"))
        assert_same_weights(sharded, one, **TOL)
    last = tmp_path / "fsdp" / "ckpt" / "last.ckpt"
    assert last.is_dir() and find_last_checkpoint(tmp_path / "fsdp") == last
    assert finished_message(last, 2, None) == "nothing to do: the run reached max_steps=2; raise it to continue"
    resumed = run_all({f"from_{name}": (fit_command("dpo", tmp_path / f"from_{name}", devices=1, strategy=None, steps=3,
                                                    args=[batch, "8", "--ckpt_path", str(tmp_path / name / "ckpt" / "last.ckpt")]),
                                        tmp_path / f"from_{name}" / "dump") for name in ("one", "fsdp")})
    (from_one,), (from_fsdp,) = resumed["from_one"], resumed["from_fsdp"]
    assert from_one["steps"] == from_fsdp["steps"] == 3
    assert_same_weights(from_fsdp["state"], from_one["state"], **TOL)


def test_the_unsharded_copy_an_fsdp_export_writes_from_holds_every_trained_tensor():
    cli = build_cli(["--config", "configs/dpo.yaml"], run=False)
    method = cli.model
    method.configure_model()
    trained = {name: torch.full_like(p, 0.5) for name, p in method.bank.named_parameters()
               if name in set(method.bank.trainable_names())}
    copy = method.unsharded_copy(trained)
    assert copy.bank is not method.bank
    assert all(torch.equal(p, trained[name]) for name, p in copy.bank.named_parameters() if name in trained)
    # Names that miss the bank's (a wrapper's prefix, say) would leave the fresh adapters in the export.
    with pytest.raises(RuntimeError, match=r"unknown \['_orig\..*missing \['model\."):
        method.unsharded_copy({f"_orig.{name}": value for name, value in trained.items()})
