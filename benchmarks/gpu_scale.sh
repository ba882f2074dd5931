#!/usr/bin/env bash
# DPO, PPO and GRPO for a few steps under each strategy preset (ddp, fsdp, deepspeed_zero2,
# deepspeed_zero3) on one GPU, with a random ~0.5B Llama: step time and peak memory per preset.
# Under 8 minutes on one H100. Needs the deepspeed package for the DeepSpeed rows.
#   bash benchmarks/gpu_scale.sh              # the measurement (CUDA)
#   bash benchmarks/gpu_scale.sh --dry-run    # anywhere: writes the model config and parses every run
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" benchmarks/gpu_scale.py "$@"
