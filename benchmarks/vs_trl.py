"""lit_rlhf against TRL on the same work, side by side: DPO (full and LoRA), SFT, RLOO and GRPO.

Both frameworks load the SAME random Llama-shaped model (built from a config, saved once to a
temporary directory, loaded by each with ``from_pretrained``), the same word-level tokenizer (one
token per word, built offline), the same synthetic data (prompt and completion lengths drawn
uniformly between bounds, as real data varies), the same batch size, lengths, learning rate,
beta, LoRA rank/alpha/targets, samples per prompt, ``max_new_tokens`` and temperature; one
optimisation pass per rollout (TRL's ``num_iterations=1``, lit_rlhf's ``ppo_epochs=1``), no
dropout, no gradient checkpointing, no evaluation, no checkpoints, minimal logging, gradient
norm clipped at 1.0 on both sides. Everything else is each framework's default as a user meets
it (lit_rlhf through its Python API: a method, a DataModule and a Lightning ``Trainer``; its
online methods sample with their default engine, TRL with transformers' ``generate``).

Each (framework, workload) run is a fresh subprocess; runs are interleaved (lit, TRL, lit, TRL,
...) so machine load drifts hit both alike, and the medians are compared. A run times its
steady state only: the wall clock from the end of optimizer step ``--warmup`` to the end of the
last step (data loading, logging and everything else in between included), over the real
(non-pad) tokens of those steps' batches (DPO, SFT) or the tokens generated in them (RLOO, GRPO:
words of the decoded completions, counted by the shared reward function), plus
``torch.cuda.max_memory_allocated`` on CUDA, and on CPU the run process's peak resident memory
(``ru_maxrss``: everything the process held, imports and model load included). Both devices also
report ``step_peak_mib``: the peak of live tensor memory during ONE training step (step ``--warmup``,
outside the timed window) above what was live when it began -- activations, logits, gradients,
the optimizer's temporaries; not the weights or the optimizer state that every step keeps. On CPU it
comes from the profiler's allocator events (that step runs profiled), on CUDA from the allocator's
peak counter. It is the CPU's stand-in for GPU memory: ``--size medium`` (hidden 1024, GQA, vocab
32k) gives activations their GPU-like share at CPU-sized batches.

    pip install -e ".[bench]"                      # TRL, pinned; never a runtime dependency
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --size small          # CPU
    python benchmarks/vs_trl.py --size 1b --device cuda --dtype bfloat16 --only dpo_full,dpo_lora
    python benchmarks/vs_trl.py --size 0.5b --device cuda --dtype bfloat16 --only grpo \\
        --prompts 16 --generations 4 --prompt-len 128 --new-tokens 128

"lit adv." in the table is how many times better lit_rlhf is: lit/TRL for tokens per second,
TRL/lit for step time and peak memory (> 1: lit_rlhf faster or smaller).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("dpo_full", "dpo_lora", "sft", "rloo", "grpo")
FRAMEWORKS = ("lit", "trl")
RESULT = "VS_TRL_RESULT"
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, EOS_ID = 0, 3

# Model shapes (Llama architecture, random weights): small for CPU; 0.5b is Qwen2.5-0.5B's shape,
# 1b is Llama-3.2-1B's (both with tied embeddings, as those models have).
SIZES = {
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False),
    # Compute next to nothing: a step's time is the framework's own (data, hooks, logging, optimizer calls).
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    # A CPU stand-in for the GPU sizes' memory: wide layers with grouped KV heads, a 32k vocabulary.
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


@dataclass
class Workload:
    """What both frameworks run; every field is the same on both sides.

    Args:
        batch: preference pairs (DPO) or examples (SFT) per optimizer step.
        prompt_lens: (shortest, longest) prompt in words, offline data.
        completion_lens: (shortest, longest) completion in words, offline data.
        prompts: prompts per rollout (RLOO, GRPO).
        generations: samples per prompt.
        prompt_len: longest prompt of a rollout in words (the shortest is half of it).
        new_tokens: ``max_new_tokens`` of a rollout.
        steps: optimizer steps per run (offline).
        online_steps: optimizer steps per run (online: one rollout each).
        warmup: steps left out of the timing.
        lr: learning rate (constant schedule, no warmup).
        beta: DPO's beta.
        rloo_kl: RLOO's KL coefficient (TRL ``beta``, lit_rlhf ``kl_coef``), k1 in the reward.
        grpo_beta: GRPO's KL coefficient (0 is both frameworks' default: no reference forward).
        lora_r: LoRA rank (``all-linear`` targets, alpha = 2 r, no dropout).
    """

    batch: int = 8
    prompt_lens: tuple[int, int] = (16, 64)
    completion_lens: tuple[int, int] = (16, 96)
    prompts: int = 4
    generations: int = 4
    prompt_len: int = 32
    new_tokens: int = 32
    steps: int = 10
    online_steps: int = 6
    warmup: int = 2
    lr: float = 1e-5
    beta: float = 0.1
    rloo_kl: float = 0.05
    grpo_beta: float = 0.0
    lora_r: int = 16
    seed: int = 0

    @property
    def max_length(self) -> int:
        """Longest prompt + completion in tokens: words, BOS and EOS, with room to spare."""
        return self.prompt_lens[1] + self.completion_lens[1] + 4


GPU_WORKLOAD = dict(prompt_lens=(64, 256), completion_lens=(64, 256), prompts=16, generations=4, prompt_len=128,
                    new_tokens=128, steps=8, online_steps=5)


# -- offline assets: tokenizer, model, data ------------------------------------------------------


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer: ``<s>`` + one token per whitespace-separated word ``w<id>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def words(rng: random.Random, vocab_size: int, lens: tuple[int, int]) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIAL), vocab_size)}" for _ in range(rng.randint(*lens)))


def synthetic_rows(kind: str, n: int, vocab_size: int, work: Workload) -> list[dict]:
    """``n`` rows of ``kind`` (``preference``, ``sft`` or ``prompt``) with lengths drawn uniformly
    in the workload's bounds; the same seed gives the same rows."""
    rng = random.Random(f"{work.seed}-{kind}")
    if kind == "prompt":
        return [{"prompt": words(rng, vocab_size, (work.prompt_len // 2, work.prompt_len - 1))} for _ in range(n)]
    rows = []
    for _ in range(n):
        row = {"prompt": words(rng, vocab_size, work.prompt_lens)}
        if kind == "preference":
            row["chosen"] = words(rng, vocab_size, work.completion_lens)
            row["rejected"] = words(rng, vocab_size, work.completion_lens)
        elif kind == "sft":
            row["completion"] = words(rng, vocab_size, work.completion_lens)
        else:
            raise ValueError(f"unknown row kind {kind!r}; expected preference, sft or prompt")
        rows.append(row)
    return rows


def write_assets(directory: Path, size: str, dtype: str, device: str, work: Workload) -> None:
    """The model (random weights), its tokenizer, and the data files, written once per invocation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         max_position_embeddings=4096, bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         attention_dropout=0.0, dtype=dtype)
    torch.manual_seed(work.seed)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(directory / "model")
    build_tokenizer(shape["vocab_size"]).save_pretrained(directory / "model")
    del model
    rows = {"preference": work.batch * (work.steps + 2), "sft": work.batch * (work.steps + 2),
            "prompt": work.prompts * (work.online_steps + 2)}
    for kind, n in rows.items():
        with open(directory / f"{kind}.jsonl", "w") as f:
            for row in synthetic_rows(kind, n, shape["vocab_size"], work):
                f.write(json.dumps(row) + "\n")


# -- what both sides share inside a run -----------------------------------------------------------

#: Words generated per rollout, appended by ``reward`` (both frameworks call it once per rollout).
GENERATED: list[int] = []


def reward(prompts, completions, **kwargs) -> list[float]:
    """The share of even-numbered words: cheap, varied across samples (so group advantages are not
    zero), and it records how many tokens the rollout generated (words of the decoded completions)."""
    GENERATED.append(sum(len(c.split()) for c in completions))
    scores = []
    for completion in completions:
        ids = [int(w[1:]) for w in completion.split() if w[1:].isdigit()]
        scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return scores


@dataclass
class Probe:
    """Step-end timestamps and per-step token counts, filled in by the framework's callback, and the
    peak tensor memory of step ``memory_step`` (1-based; ``None``: not measured)."""

    device: str
    ends: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)
    memory_step: int | None = None
    step_peak_mib: float | None = None
    _memory: object = None

    def step_end(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.memory_step is None:
            return
        if len(self.ends) == self.memory_step - 1:
            self._memory = StepMemory(self.device)
        elif len(self.ends) == self.memory_step:
            self.step_peak_mib = self._memory.stop()

    def count(self, input_ids) -> None:
        self.tokens.append(int((input_ids != PAD_ID).sum()))


class StepMemory:
    """Peak live tensor bytes from now until ``stop()``, above those live now: CUDA's allocator peak
    counter, or on CPU the profiler's allocator events (every allocation and free, summed in order)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        if device == "cuda":
            self.run_peak = torch.cuda.max_memory_allocated()  # the run's peak so far, which the reset forgets
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()

    def stop(self) -> float:
        import torch

        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() - self.start) / 2**20
        self.profiler.__exit__(None, None, None)
        events = self.profiler.profiler.kineto_results.events()
        live = peak = 0
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20


def steady_state(probe: Probe, warmup: int, online: bool) -> dict:
    """Step time and tokens/s from the end of step ``warmup`` (>= 1) to the end of the last step; on CPU
    also per second of this process's CPU time (``cpu_``), which other jobs on a shared machine disturb far
    less than the wall clock."""
    timed = len(probe.ends) - warmup
    if warmup < 1 or timed < 1:
        raise RuntimeError(f"{len(probe.ends)} steps ran; need warmup >= 1 and more than warmup={warmup}")
    seconds = probe.ends[-1] - probe.ends[warmup - 1]
    counts = GENERATED if online else probe.tokens
    tokens = sum(counts[warmup:len(probe.ends)])
    result = {"step_s": seconds / timed, "tokens_per_s": tokens / seconds, "timed_steps": timed}
    if probe.device == "cpu" and probe.cpu_ends:
        cpu_seconds = probe.cpu_ends[-1] - probe.cpu_ends[warmup - 1]
        result.update(cpu_step_s=cpu_seconds / timed, tokens_per_cpu_s=tokens / cpu_seconds)
    return result


# -- one run of one framework ------------------------------------------------------------------


def run_lit(workload: str, assets: Path, work: Workload, dtype: str, device: str, probe: Probe,
            engine: str | None = None) -> None:
    import lightning.pytorch as pl

    from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lit_rlhf.methods import DPO, GRPO, RLOO, SFT
    from lit_rlhf.models import BankSpec, LoraSpec
    from lit_rlhf.rollout import RewardSpec, SamplingConfig

    class Callback(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if "input_ids" in batch:
                probe.count(batch["input_ids"])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            probe.step_end()

    pl.seed_everything(work.seed, verbose=False)
    mode = "full" if workload == "dpo_full" else "lora"
    bank = BankSpec(model=str(assets / "model"), dtype=dtype, train_mode=mode,
                    lora=LoraSpec(r=work.lora_r, alpha=2 * work.lora_r, dropout=0.0, target_modules="all-linear"))
    common = dict(bank=bank, learning_rate=work.lr)
    online = dict(sampling=SamplingConfig(max_new_tokens=work.new_tokens, temperature=1.0),
                  rewards=[RewardSpec(kind="function", function="vs_trl:reward")],
                  num_samples_per_prompt=work.generations, update_epochs=1, num_mini_batches=1, max_grad_norm=1.0,
                  **({} if engine is None else {"engine": engine}))
    steps = work.steps
    if workload.startswith("dpo"):
        method = DPO(beta=work.beta, **common)
        data = PreferenceDataModule(train=str(assets / "preference.jsonl"), batch_size=work.batch,
                                    max_length=work.max_length, seed=work.seed)
    elif workload == "sft":  # packing: the shipped configs/sft.yaml; TRL runs padding_free on the same batches
        method = SFT(**common)
        data = SFTDataModule(train=str(assets / "sft.jsonl"), batch_size=work.batch, max_length=work.max_length,
                             packing=True, seed=work.seed)
    else:
        steps = work.online_steps
        if workload == "rloo":
            method = RLOO(kl_coef=work.rloo_kl, **online, **common)
        else:  # TRL's default loss_type (dapo) on both sides
            method = GRPO(beta=work.grpo_beta, loss_type="dapo", **online, **common)
        data = PromptDataModule(train=str(assets / "prompt.jsonl"), batch_size=work.prompts,
                                max_length=work.prompt_len + 1, seed=work.seed)
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Callback()], **({} if method.automatic_optimization is False else {"gradient_clip_val": 1.0}),
    )
    trainer.fit(method, datamodule=data)


def run_trl(workload: str, assets: Path, work: Workload, dtype: str, device: str, probe: Probe, out: Path) -> None:
    import torch

    try:
        import trl
        from datasets import load_dataset
    except ImportError as e:
        sys.exit(f"vs_trl needs TRL and datasets ({e}): pip install -e \".[bench]\"")
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end()

    def counting(trainer_class):
        class Counting(trainer_class):
            def training_step(self, model, inputs, *args, **kwargs):
                probe.count(inputs["input_ids"])
                return super().training_step(model, inputs, *args, **kwargs)

        return Counting

    torch.manual_seed(work.seed)
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    peft_config = None
    if workload != "dpo_full":
        peft_config = LoraConfig(r=work.lora_r, lora_alpha=2 * work.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(out), learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0,
        gradient_accumulation_steps=1, max_grad_norm=1.0, gradient_checkpointing=False,
        bf16=dtype == "bfloat16", use_cpu=device == "cpu", model_init_kwargs={"dtype": dtype},
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=work.seed, dataloader_num_workers=0,
    )
    model = str(assets / "model")
    if workload.startswith("dpo"):
        args = trl.DPOConfig(per_device_train_batch_size=work.batch, max_steps=work.steps, beta=work.beta,
                             loss_type=["sigmoid"], max_length=work.max_length, **common)
        dataset = load_dataset("json", data_files=str(assets / "preference.jsonl"), split="train")
        trainer = counting(trl.DPOTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           peft_config=peft_config, callbacks=[Callback()])
    elif workload == "sft":
        args = trl.SFTConfig(per_device_train_batch_size=work.batch, max_steps=work.steps, padding_free=True,
                             max_length=None, **common)
        dataset = load_dataset("json", data_files=str(assets / "sft.jsonl"), split="train")
        trainer = counting(trl.SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           peft_config=peft_config, callbacks=[Callback()])
    else:
        online = dict(per_device_train_batch_size=work.prompts * work.generations, num_generations=work.generations,
                      max_completion_length=work.new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
                      epsilon=0.2, max_steps=work.online_steps, **common)
        dataset = load_dataset("json", data_files=str(assets / "prompt.jsonl"), split="train")
        if workload == "rloo":
            args, trainer_class = trl.RLOOConfig(beta=work.rloo_kl, **online), trl.RLOOTrainer
        else:
            args, trainer_class = trl.GRPOConfig(beta=work.grpo_beta, loss_type="dapo", **online), trl.GRPOTrainer
        trainer = trainer_class(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=peft_config, callbacks=[Callback()])
    trainer.train()


def worker(args: argparse.Namespace) -> None:
    """One (framework, workload) run in this process; prints ``VS_TRL_RESULT {json}``."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # "vs_trl:reward" resolves to this file
    import vs_trl  # the module both frameworks call `reward` from (not __main__, whose counter would differ)

    torch.set_num_threads(args.threads)
    work = Workload(**json.loads(args.workload_json))
    assets = Path(args.assets)
    # Step ``warmup`` is the last one outside the timed window; the first has no optimizer state yet.
    probe = vs_trl.Probe(args.device, memory_step=work.warmup if work.warmup >= 2 else None)
    with tempfile.TemporaryDirectory() as out:
        if args.worker == "lit":
            vs_trl.run_lit(args.run, assets, work, args.dtype, args.device, probe, engine=args.lit_engine)
        else:
            vs_trl.run_trl(args.run, assets, work, args.dtype, args.device, probe, Path(out))
    result = vs_trl.steady_state(probe, work.warmup, online=args.run in ("rloo", "grpo"))
    if probe.step_peak_mib is not None:
        result["step_peak_mib"] = probe.step_peak_mib
    if args.device == "cuda":
        result["peak_gib"] = max(torch.cuda.max_memory_allocated(), getattr(probe._memory, "run_peak", 0)) / 2**30
    else:  # the run's whole process (a fresh one per run): imports, model, data and training; Linux reports KiB
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{RESULT} {json.dumps(result)}", flush=True)


# -- the side-by-side driver ------------------------------------------------------------------


def schedule(workloads: list[str], repeats: int, warmup_runs: int = 0) -> list[tuple[str, int, str]]:
    """Run order: ``warmup_runs`` discarded runs per framework of the first workload (numbered -1,
    -2, ...), then ``repeats`` rounds, each running every workload once per framework, lit then TRL
    (lit, TRL, lit, TRL, ...). Round-major, so a run cut short by ``--budget`` still has every
    workload measured on both sides.

    The warm-up runs take what the first process on a fresh machine pays alone (seen on an H100: a
    DPO step 2.7x slower in the first lit_rlhf process than in every later one), which would
    otherwise land on whichever framework runs first."""
    warmup = [(workloads[0], -1 - r, fw) for r in range(warmup_runs) for fw in FRAMEWORKS]
    return warmup + [(w, r, fw) for r in range(repeats) for w in workloads for fw in FRAMEWORKS]


#: Per metric: True when higher is better (the advantage is lit/TRL), else TRL/lit.
METRICS = {"tokens_per_s": True, "step_s": False, "tokens_per_cpu_s": True, "cpu_step_s": False, "peak_gib": False,
           "peak_rss_gib": False, "step_peak_mib": False}


def summarize(results: list[dict]) -> list[dict]:
    """Medians per (workload, framework, metric) and lit_rlhf's advantage (> 1: lit_rlhf better).

    Args:
        results: ``{"workload", "framework", <metric>: value, ...}`` per successful run.
    """
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        for metric, higher_better in METRICS.items():
            med = {}
            for fw in FRAMEWORKS:
                values = [r[metric] for r in results if r["workload"] == workload and r["framework"] == fw and metric in r]
                if values:
                    med[fw] = statistics.median(values)
            if len(med) < 2:
                continue
            lit, trl = med["lit"], med["trl"]
            advantage = (lit / trl if higher_better else trl / lit) if min(lit, trl) > 0 else float("nan")
            rows.append({"workload": workload, "metric": metric, "lit": lit, "trl": trl, "lit_advantage": advantage})
    return rows


def timed(results: list[dict]) -> list[dict]:
    """The runs that count: finished, and not a discarded warm-up run."""
    return [r for r in results if "error" not in r and not r.get("warmup_run")]


def format_table(rows: list[dict]) -> str:
    lines = ["| workload | metric | lit_rlhf | TRL | lit adv. |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['metric']} | {r['lit']:.4g} | {r['trl']:.4g} | {r['lit_advantage']:.2f}x |")
    return "\n".join(lines)


def run_one(workload: str, framework: str, assets: Path, work: Workload, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--run", workload,
               "--assets", str(assets), "--workload-json", json.dumps(asdict(work)), "--device", args.device,
               "--dtype", args.dtype, "--threads", str(args.threads)] + (["--lit-engine", args.lit_engine] if args.lit_engine else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, text=True, capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"workload": workload, "framework": framework, "error": f"timed out after {args.timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
            result.update(workload=workload, framework=framework, wall_s=time.perf_counter() - started)
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
    return {"workload": workload, "framework": framework, "error": f"rc={done.returncode}: " + "\n".join(tail)}


@functools.cache
def versions() -> str:
    import importlib.metadata as md

    import torch

    names = ["torch", "transformers", "lightning", "peft", "trl", "datasets"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} missing")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    return f"{device}; " + ", ".join(found)


def workload_of(args: argparse.Namespace) -> Workload:
    work = Workload(**(GPU_WORKLOAD if args.size in ("0.5b", "1b") else {}))
    for name in ("prompts", "generations", "prompt_len", "new_tokens", "batch", "steps", "online_steps", "warmup"):
        value = getattr(args, name)
        if value is not None:
            setattr(work, name, value)
    if work.prompt_len < 4:
        raise SystemExit(f"--prompt-len must be >= 4, got {work.prompt_len}")
    if work.warmup < 1 or min(work.steps, work.online_steps) <= work.warmup:
        raise SystemExit(f"--steps ({work.steps}) and --online-steps ({work.online_steps}) must exceed --warmup "
                         f"({work.warmup}, >= 1): only the steps after the warm-up are timed")
    return work


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights dtype; default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per framework and workload")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--json", default=None, help="save every run and the summary here")
    parser.add_argument("--threads", type=int, default=None, help="torch/OMP threads per run (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all runs: no run starts that would likely end past it (the summary keeps "
                             "what ran)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per rollout (RLOO, GRPO)")
    parser.add_argument("--generations", type=int, default=None, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=None, help="longest rollout prompt in tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens of a rollout")
    parser.add_argument("--batch", type=int, default=None, help="DPO pairs / SFT examples per step")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per DPO/SFT run")
    parser.add_argument("--online-steps", type=int, default=None, help="rollouts (= optimizer steps) per RLOO/GRPO run")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (>= 1)")
    parser.add_argument("--warmup-runs", type=int, default=0,
                        help="discarded runs per framework before the timed rounds (first-process costs of a fresh machine)")
    parser.add_argument("--lit-engine", default=None,
                        help="lit_rlhf's rollout engine (RLOO, GRPO), e.g. hf_compiled; default: the methods' default (auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (workload, run order) and exit")
    # worker mode (one run in this process)
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    unknown = [w for w in args.only.split(",") if w not in WORKLOADS]
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    work = workload_of(args)
    workloads = args.only.split(",")
    plan = schedule(workloads, args.repeats, args.warmup_runs)
    print(f"vs_trl: size {args.size} ({SIZES[args.size]['hidden_size']} hidden, {SIZES[args.size]['num_hidden_layers']} "
          f"layers, vocab {SIZES[args.size]['vocab_size']}), {args.device}, {args.dtype}, {args.threads} thread(s)")
    print(f"workload: {json.dumps(asdict(work))}" + (f"; lit_rlhf engine {args.lit_engine}" if args.lit_engine else ""))
    if args.dry_run:
        print("runs: " + ", ".join(f"{w}#{r}:{fw}" for w, r, fw in plan))
        return
    import importlib.util

    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"vs_trl needs {' and '.join(missing)} (TRL is never a runtime dependency): pip install -e \".[bench]\"")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda but torch sees no CUDA device")
    print(versions(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        started = time.perf_counter()
        write_assets(Path(tmp), args.size, args.dtype, args.device, work)
        print(f"assets written in {time.perf_counter() - started:.1f} s", flush=True)
        loop_start = time.perf_counter()
        for i, (workload, repeat, framework) in enumerate(plan):
            longest = max((r.get("wall_s", 0.0) for r in results), default=0.0)
            if args.budget and time.perf_counter() - loop_start + 1.2 * longest > args.budget:
                print(f"budget of {args.budget:.0f} s reached: {len(plan) - i} run(s) left out", flush=True)
                break
            result = run_one(workload, framework, Path(tmp), work, args)
            if repeat < 0:
                result["warmup_run"] = True
            results.append(result)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
            print(json.dumps(shown), flush=True)
            save(args, work, results)  # after every run: a killed benchmark keeps what it measured
    print(format_table(summarize(timed(results))))
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} run(s) failed (first: {failed[0]['workload']}/{failed[0]['framework']}: {failed[0]['error']})")


def save(args: argparse.Namespace, work: Workload, results: list[dict]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        rows = summarize(timed(results))
        Path(args.json).write_text(json.dumps({"args": vars(args), "workload": asdict(work), "versions": versions(),
                                               "runs": results, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
