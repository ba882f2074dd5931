"""DPO, PPO and GRPO for a few steps under each strategy preset on one GPU: step time and peak memory.

The model is a random ~0.5B Llama (16 layers, hidden 1536; the toy tokenizer's 65-token
vocabulary, so nearly every parameter sits in the decoder layers), its config written offline and
built with ``bank.random_init: true``, in bfloat16. One process per (preset, method): the shipped
method config, the preset, and an overlay that swaps in the model and a probe callback; the
method's own callbacks (checkpoints, export) are dropped. A "step" is one ``training_step``: a
batch for DPO, a rollout (generation, scoring and its optimizer steps) for PPO and GRPO. The first
step is left out of the mean (allocator and kernel warm-up).

    bash benchmarks/gpu_scale.sh              # on a CUDA machine, < 8 minutes on one H100
    bash benchmarks/gpu_scale.sh --dry-run    # anywhere: writes the model config, parses every run

Presets that refuse a method (FSDP and the online methods) are reported as refused, with the
reason the CLI printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
METHODS = {"dpo": 4, "ppo": 12, "grpo": 12}  # max_steps: optimizer steps (4 per PPO/GRPO rollout: 3 rollouts)
RESULT = "SCALE_RESULT"


class StepProbe(pl.Callback):
    """Times every training_step and prints ``SCALE_RESULT <mean s/step> <peak GiB> <steps>`` at the end (rank 0)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        timed = self.times[1:] or self.times
        peak = torch.cuda.max_memory_allocated() / 2**30
        if trainer.is_global_zero:
            print(f"{RESULT} {sum(timed) / len(timed):.4f} {peak:.2f} {len(self.times)}", flush=True)


def write_model_config(directory: Path) -> Path:
    """A ~0.5B Llama config on the toy tokenizer's vocabulary (no weights: random_init builds them)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(REPO / "assets/toy/base")
    config.update({
        "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 12,
        "num_key_value_heads": 12, "head_dim": 128, "max_position_embeddings": 128, "dtype": "bfloat16",
    })
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def overlay(workdir: Path, model: Path, *, dry_run: bool) -> Path:
    path = workdir / "overlay.yaml"
    probe = "" if dry_run else "    - class_path: gpu_scale.StepProbe\n"
    path.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  limit_val_batches: 0\n"
        "  devices: 1\n"
        f"  callbacks:\n{probe or '    []' + chr(10)}"
        "model:\n"
        "  init_args:\n"
        "    bank:\n"
        f"      model: {model}\n"
        f"      tokenizer: {REPO / 'assets/toy/base'}\n"
        "      random_init: true\n"
        "      dtype: bfloat16\n"
    )
    return path


def command(method: str, preset: str, overlay_path: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "lit_rlhf.cli", "fit", "--config", f"configs/{method}.yaml",
            "--config", f"configs/strategy/{preset}.yaml", "--config", str(overlay_path),
            "--trainer.max_steps", str(METHODS[method]), "--trainer.default_root_dir", str(workdir / f"{preset}-{method}")]


def run(method: str, preset: str, overlay_path: Path, workdir: Path, timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "benchmarks")]))
    try:
        done = subprocess.run(command(method, preset, overlay_path, workdir), cwd=REPO, env=env, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"| {preset} | {method} | timed out after {timeout:.0f} s | | |"
    found = re.search(rf"{RESULT} (\S+) (\S+) (\d+)", done.stdout)
    if done.returncode == 0 and found:
        seconds, peak, steps = found.groups()
        return f"| {preset} | {method} | {float(seconds):.3f} | {float(peak):.2f} | {steps} |"
    refusal = re.search(r"ScaleError: (.*)", done.stderr + done.stdout)
    reason = refusal.group(1)[:120] if refusal else (done.stderr or done.stdout).strip().splitlines()[-1][:160]
    return f"| {preset} | {method} | {'refused' if refusal else 'failed'}: {reason} | | |"


def parameter_count(model: Path) -> int:
    """Parameters of the model config, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in built.parameters())


def dry_run(overlay_path: Path, workdir: Path, model: Path) -> None:
    """Count the model's parameters and parse every run's configuration (the strategy is not built:
    DeepSpeed needs CUDA)."""
    from lit_rlhf.cli import build_cli

    print(f"model: {parameter_count(model) / 1e9:.2f}B parameters", file=sys.stderr)
    sys.argv = sys.argv[:1]  # the CLI reads its arguments from args= only
    for preset in PRESETS:
        for method in METHODS:
            args = command(method, preset, overlay_path, workdir)[3:] + ["--print_config"]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    build_cli(args)
            except SystemExit as exit_info:  # --print_config exits 0 after printing
                if exit_info.code:
                    raise
            print(f"ok: {preset} {method}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="write the model config and parse every run; no GPU")
    parser.add_argument("--workdir", default="runs/gpu_scale")
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS + ["deepspeed_zero3_offload"])
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per run")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    model = write_model_config(workdir / "llama-0.5b")
    overlay_path = overlay(workdir, model, dry_run=args.dry_run)
    if args.dry_run:
        dry_run(overlay_path, workdir, model)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_scale needs a CUDA GPU (--dry-run checks the runs without one)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lightning {pl.__version__}")
    print("| preset | method | s/step | peak GiB | steps |\n|---|---|---|---|---|", flush=True)
    for preset in args.presets:
        for method in METHODS:
            print(run(method, preset, overlay_path, workdir, args.timeout), flush=True)


if __name__ == "__main__":
    main()
