"""SFT -> Reward -> PPO on the embedded toy task, on ONE base model, then a ground-truth evaluation.

    OMP_NUM_THREADS=1 python examples/pipeline.py [--out runs/pipeline]

1. SFT trains a ``policy`` LoRA adapter on the demonstrations of ``assets/toy/base`` and exports
   it merged into the base (``<out>/sft/export/merged``, plain transformers ``save_pretrained``).
2. The merged SFT model is the base of every later stage. Reward trains a ``reward`` adapter +
   score head on it (Bradley-Terry on preference pairs) and saves it with the mean/std of its
   scores over the validation pairs (``<out>/reward/export/adapter``).
3. PPO loads that reward adapter, frozen, onto the same SFT base, beside a fresh ``policy`` and
   ``value`` adapter: policy, reference (the SFT model = the base with adapters off), reward
   model and critic are four roles of one model in memory (``<out>/ppo/export/adapter``).
4. Evaluation on the held-out prompts (never seen in training): the ground-truth scorer
   ``lit_rlhf.toy.score`` on sampled and greedy completions of the original base, the SFT model
   and the PPO policy; the reward model's (normalised) score of the same samples; and each
   model's KL to its reference (mean over sampled responses of sum_t log pi - log pi_ref).

The hyperparameters are those of configs/sft.yaml, configs/reward.yaml and configs/ppo.yaml
(except PPO's ``kl_coef``: 0.2 here, see ``ppo_stage``);
examples/pipeline.sh runs the same stages with ``lit-rlhf fit`` and then ``--evaluate-only``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import toy
from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.losses import token_logps
from lit_rlhf.methods import SFT, ExportOnFitEnd, RewardModeling
from lit_rlhf.methods.ppo import PPO
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec, load_tokenizer
from lit_rlhf.rollout import RewardSpec, SamplingConfig, build_engine

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = ROOT / "assets/toy/base"
DATA = ROOT / "assets/toy/data"
LORA = LoraSpec(r=8, alpha=16)
MAX_NEW_TOKENS = 10  # configs/ppo.yaml sampling.max_new_tokens; the evaluation decodes as long


def paths(out: str | Path) -> dict[str, Path]:
    """Where each stage writes what the next one reads."""
    out = Path(out)
    return {
        "sft_adapter": out / "sft/export/adapter",
        "sft_merged": out / "sft/export/merged",
        "reward_adapter": out / "reward/export/adapter",
        "ppo_adapter": out / "ppo/export/adapter",
        "results": out / "results.json",
    }


def trainer(root: Path, max_epochs: int, *, merged: bool = False, **kwargs) -> pl.Trainer:
    """The Trainer of every stage: checkpoints and TensorBoard logs under ``root``, export to ``root/export``."""
    return pl.Trainer(
        default_root_dir=str(root),
        max_epochs=max_epochs,
        accelerator="auto",
        devices=1,
        callbacks=[ModelCheckpoint(save_last=True), ExportOnFitEnd(dirpath=str(root / "export"), merged=merged)],
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# -- the three stages ----------------------------------------------------------------------------


def sft_stage(out: Path, *, max_epochs: int = 2) -> Path:
    """configs/sft.yaml, exporting the merged model. Returns the merged model's directory."""
    pl.seed_everything(0)
    method = SFT(learning_rate=3e-3, warmup_steps=5, lr_scheduler="cosine",
                 bank=BankSpec(model=str(TOY_BASE), train_mode="lora", lora=LORA))
    data = SFTDataModule(train=str(DATA / "sft_train.jsonl"), val=str(DATA / "sft_val.jsonl"), batch_size=16,
                         max_length=64, packing=True, completion_only_loss=True)
    trainer(out / "sft", max_epochs, merged=True, log_every_n_steps=5, gradient_clip_val=1.0).fit(method, data)
    return paths(out)["sft_merged"]


def reward_stage(out: Path, base: Path, *, max_epochs: int = 3) -> Path:
    """configs/reward.yaml on the SFT model. Returns the reward adapter's directory (adapter, head, statistics)."""
    pl.seed_everything(0)
    method = RewardModeling(center_coefficient=0.01, normalize_on="val", learning_rate=3e-3, warmup_steps=5,
                            lr_scheduler="cosine", bank=BankSpec(model=str(base), train_mode="lora", lora=LORA))
    data = PreferenceDataModule(train=str(DATA / "preference_train.jsonl"), val=str(DATA / "preference_val.jsonl"),
                                batch_size=16, max_length=64)
    trainer(out / "reward", max_epochs, log_every_n_steps=5, gradient_clip_val=1.0).fit(method, data)
    return paths(out)["reward_adapter"]


def ppo_stage(out: Path, base: Path, reward_adapter: Path, *, max_epochs: int = 4, kl_coef: float = 0.2) -> Path:
    """configs/ppo.yaml on the SFT model, rewarded by the reward adapter on that same base.

    ``kl_coef`` is 0.2 rather than the config's 0.05: against a learned reward (not the
    ground-truth function configs/ppo.yaml uses) a weak KL penalty lets the policy drift to
    responses the reward model never saw and over-rates (see examples/README.md).
    """
    pl.seed_everything(0)
    method = PPO(
        rewards=[RewardSpec(kind="adapter", adapter="reward", normalize="saved")],
        missing_eos_penalty=0.5,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0),
        engine="hf",
        num_samples_per_prompt=2,
        update_epochs=2,
        num_mini_batches=2,
        max_grad_norm=1.0,
        kl_coef=kl_coef,
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        critic="adapter",
        log_samples_every_n_rollouts=6,
        learning_rate=3e-3,
        lr_scheduler="constant",
        bank=BankSpec(
            model=str(base),
            train_mode="lora",
            lora=LORA,
            adapters=[AdapterSpec("policy"), AdapterSpec("value"),
                      AdapterSpec("reward", path=str(reward_adapter), head="score", trainable=False)],
        ),
    )
    data = PromptDataModule(train=str(DATA / "prompt_train.jsonl"), val=str(DATA / "prompt_val.jsonl"),
                            batch_size=8, max_length=32)
    trainer(out / "ppo", max_epochs, log_every_n_steps=1).fit(method, data)
    return paths(out)["ppo_adapter"]


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def sample(bank: AdapterBank, tokenizer, prompts: list[str], *, adapter: str | None, do_sample: bool, seed: int):
    """A ``Rollout`` of ``prompts`` from ``adapter`` of ``bank`` (its reference when ``None``)."""
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=do_sample).resolved(tokenizer)
    return build_engine("hf").generate(bank, adapter, enc["input_ids"], enc["attention_mask"], sampling)


@torch.no_grad()
def response_logps(bank: AdapterBank, rollout, *, adapter: str | None) -> torch.Tensor:
    """``(b,)`` summed log-probs of each response (stop token included) under ``adapter`` (reference when ``None``)."""
    if adapter is None:
        with bank.reference():
            logits = bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids).logits
    else:
        with bank.role(adapter):
            logits = bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids).logits
    start = rollout.prompt_ids.shape[1] - 1
    logits = logits[:, start : start + rollout.response_ids.shape[1]]
    return (token_logps(logits, rollout.response_ids) * rollout.response_mask).sum(dim=1)


def decode(tokenizer, rollout) -> list[str]:
    lengths = rollout.response_mask.sum(dim=1).tolist()
    return tokenizer.batch_decode([r[:n] for r, n in zip(rollout.response_ids.tolist(), lengths)],
                                  skip_special_tokens=True)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@torch.no_grad()
def evaluate(out: str | Path, *, samples: int = 16, seed: int = 0) -> dict[str, dict]:
    """Ground-truth scores, reward-model scores and KL to the reference of base, SFT and PPO."""
    p = paths(out)
    held_out = toy.split_prompts()[1]
    # The original base (the SFT stage's reference) ...
    base_spec = BankSpec(model=str(TOY_BASE))
    base_bank, tokenizer = AdapterBank(base_spec).eval(), load_tokenizer(base_spec)
    # ... and the PPO bank as the PPO stage had it: the SFT model with the policy and reward adapters.
    ppo_spec = BankSpec(model=str(p["sft_merged"]), adapters=[
        AdapterSpec("policy", path=str(p["ppo_adapter"]), trainable=False),
        AdapterSpec("reward", path=str(p["reward_adapter"]), head="score", trainable=False),
    ])
    ppo_bank = AdapterBank(ppo_spec).eval()
    norm = json.loads((p["reward_adapter"] / "lit_rlhf.json").read_text())["normalization"]

    # (label, bank, adapter sampled from, its reference as (bank, adapter) or None)
    models = [
        ("base", base_bank, None, None),
        ("sft", ppo_bank, None, (base_bank, None)),     # the merged SFT model; its reference is the base
        ("ppo", ppo_bank, "policy", (ppo_bank, None)),  # the PPO policy; its reference is the SFT model
    ]
    results = {}
    for label, bank, adapter, reference in models:
        sampled = sample(bank, tokenizer, held_out * samples, adapter=adapter, do_sample=True, seed=seed)
        greedy = sample(bank, tokenizer, held_out, adapter=adapter, do_sample=False, seed=seed)
        texts, greedy_texts = decode(tokenizer, sampled), decode(tokenizer, greedy)
        rm = ppo_bank.score(sampled.input_ids, sampled.attention_mask, adapter="reward", position_ids=sampled.position_ids)
        row = {
            "score_sampled": mean(toy.score(t) for t in texts),
            "score_greedy": mean(toy.score(t) for t in greedy_texts),
            "reward_model": mean(((rm - norm["mean"]) / norm["std"]).tolist()),
            "ended_with_eos": sampled.ended.float().mean().item(),
            "response_length": sampled.response_mask.sum(dim=1).float().mean().item(),
            "kl_to_reference": None,
            "example": f"{held_out[0]} -> {greedy_texts[0]}",
        }
        if reference is not None:
            ref_bank, ref_adapter = reference
            kl = response_logps(bank, sampled, adapter=adapter) - response_logps(ref_bank, sampled, adapter=ref_adapter)
            row["kl_to_reference"] = kl.mean().item()
        results[label] = row
    return results


def format_table(results: dict[str, dict], samples: int) -> str:
    n = len(toy.split_prompts()[1])
    lines = [
        f"held-out prompts: {n} (ground truth = lit_rlhf.toy.score in [-1, 1]; {samples} samples per prompt at T=1)",
        f"{'model':<6} {'sampled':>8} {'greedy':>8} {'RM (z)':>8} {'KL to ref':>10} {'EOS':>5} {'len':>5}  greedy example",
    ]
    refs = {"base": "", "sft": " (ref: base)", "ppo": " (ref: SFT)"}
    for label, r in results.items():
        kl = "-" if r["kl_to_reference"] is None else f"{r['kl_to_reference']:.3f}"
        lines.append(f"{label:<6} {r['score_sampled']:>+8.3f} {r['score_greedy']:>+8.3f} {r['reward_model']:>+8.3f} "
                     f"{kl:>10} {r['ended_with_eos']:>5.2f} {r['response_length']:>5.1f}  {r['example']!r}{refs[label]}")
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pipeline", help="directory every stage writes under")
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--reward-epochs", type=int, default=3)
    parser.add_argument("--ppo-epochs", type=int, default=4, help="epochs over the 48 training prompts (6 rollouts each)")
    parser.add_argument("--kl-coef", type=float, default=0.2, help="PPO's KL penalty coefficient beta")
    parser.add_argument("--samples", type=int, default=16, help="sampled completions per held-out prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation's sampling")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="skip training; evaluate what the stages wrote under --out (e.g. by pipeline.sh)")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's and transformers' messages")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the pipeline (or, with ``--evaluate-only``, only its evaluation); returns the evaluation."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        transformers.utils.logging.disable_progress_bar()
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "lit_rlhf"):
            logging.getLogger(name).setLevel(logging.ERROR)
    out = Path(args.out)
    timings = {}
    if not args.evaluate_only:
        t0 = time.perf_counter()
        merged = sft_stage(out, max_epochs=args.sft_epochs)
        timings["sft"] = time.perf_counter() - t0
        print(f"[1/3] SFT     {timings['sft']:5.1f}s  merged model -> {merged}")
        t0 = time.perf_counter()
        reward = reward_stage(out, merged, max_epochs=args.reward_epochs)
        timings["reward"] = time.perf_counter() - t0
        print(f"[2/3] Reward  {timings['reward']:5.1f}s  reward adapter -> {reward}")
        t0 = time.perf_counter()
        policy = ppo_stage(out, merged, reward, max_epochs=args.ppo_epochs, kl_coef=args.kl_coef)
        timings["ppo"] = time.perf_counter() - t0
        print(f"[3/3] PPO     {timings['ppo']:5.1f}s  policy adapter -> {policy}")
    t0 = time.perf_counter()
    results = evaluate(out, samples=args.samples, seed=args.seed)
    timings["evaluate"] = time.perf_counter() - t0
    print(format_table(results, args.samples))
    paths(out)["results"].write_text(json.dumps({"results": results, "seconds": timings}, indent=2))
    return results


if __name__ == "__main__":
    main()
