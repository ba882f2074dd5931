#!/usr/bin/env bash
# SFT -> Reward -> PPO on the embedded toy task, on ONE base model, with `lit-rlhf` commands,
# then the ground-truth evaluation of held-out prompts (before vs after) and the KL to the reference.
#
#   OMP_NUM_THREADS=1 bash examples/pipeline.sh [OUT]      # OUT: default runs/pipeline (from the repo root)
#   DRY_RUN=1 bash examples/pipeline.sh                    # print the commands only
#
# Each stage is a shipped config plus command-line overrides; every stage writes
# $OUT/<stage>/lightning_logs/version_N/ (TensorBoard, config.yaml, checkpoints) and exports to a
# fixed $OUT/<stage>/export/. `--trainer.callbacks.<arg>` sets an argument of the LAST callback in
# the config's list, which is lit_rlhf.methods.ExportOnFitEnd in every shipped config.
# examples/pipeline.py is the same pipeline in Python.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/pipeline}"

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ -n "${DRY_RUN:-}" ] || "$@"
}

# 1. SFT: a policy LoRA on the demonstrations, exported merged into the base (plain transformers).
run lit-rlhf fit --config configs/sft.yaml \
  --trainer.default_root_dir "$OUT/sft" \
  --trainer.callbacks.dirpath "$OUT/sft/export" \
  --trainer.callbacks.merged true

# 2. Reward: a reward LoRA + score head, trained on the merged SFT model (the new base). Its export
#    holds the adapter, head.safetensors and the score mean/std over the validation pairs.
run lit-rlhf fit --config configs/reward.yaml \
  --model.init_args.bank.model "$OUT/sft/export/merged" \
  --trainer.default_root_dir "$OUT/reward" \
  --trainer.callbacks.dirpath "$OUT/reward/export"

# 3. PPO on the same SFT base: policy and value adapters are trained; the reward adapter is loaded
#    frozen onto that base (no second model); the reference is the base with adapters off = the SFT
#    model. kl_coef 0.2 instead of the config's 0.05 (see examples/README.md).
run lit-rlhf fit --config configs/ppo.yaml \
  --model.init_args.bank.model "$OUT/sft/export/merged" \
  --model.init_args.bank.adapters "[{name: policy}, {name: value}, {name: reward, path: $OUT/reward/export/adapter}]" \
  --model.init_args.rewards "[{kind: adapter, adapter: reward, normalize: saved}]" \
  --model.init_args.kl_coef 0.2 \
  --trainer.default_root_dir "$OUT/ppo" \
  --trainer.callbacks.dirpath "$OUT/ppo/export"

# 4. Evaluate base, SFT model and PPO policy on the held-out prompts with the ground-truth scorer,
#    and each one's KL to its reference (writes $OUT/results.json).
run python examples/pipeline.py --out "$OUT" --evaluate-only
