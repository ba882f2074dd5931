"""Decode-only speed of the rollout engines: generated tokens per second, hf vs hf_static (and auto).

A random model built from a config (offline; ``small``: Llama, hidden 256, 4 layers, vocab 4096;
``0.5b``: the Qwen2.5-0.5B shape; ``1b``: the Llama-3.2-1B shape) answers the same random
prompts of ``--prompt-len`` tokens (rows left-padded by up to a quarter of that, as a real batch is)
with ``--new-tokens`` sampled tokens (temperature 1, as rollouts sample), through each engine in
turn, ``--repeats`` times interleaved (so a load change on the machine hits every engine alike).
Cases (``--cases``): the plain base (``base``), a LoRA policy adapter active (``lora``, what
rollouts run: its deltas merged into the base while it generates, ``models/lora_merge.py``), and the
same adapter through peft's LoRA branches (``lora_unmerged``, the anchor of that lever). The stop token is one the random model almost never samples, so every engine decodes the
full length. The first call of each engine is reported apart as warm-up (on CUDA it holds the
compilation and CUDA-graph capture of hf_static's decode step); the ratio is median tokens/s
over the ``hf`` engine's. Seconds are wall-clock on CUDA, the process's CPU time on CPU (run
with ``OMP_NUM_THREADS=1``: on a shared machine wall-clock time measures the neighbours too).

    python benchmarks/decode_speed.py --device cpu --size small
    python benchmarks/decode_speed.py --device cuda --size 0.5b --batch 64 --new-tokens 128
    python benchmarks/decode_speed.py --smoke          # seconds, anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from unittest import mock
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets/toy/base"

#: model_type and config fields of each size.
SIZES = {
    "small": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=4096)),
    "0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)),
}
ENGINES = ("hf", "hf_static", "auto")
CASES = ("base", "lora", "lora_unmerged")


def write_config(size: str, directory: Path, max_positions: int) -> Path:
    from transformers import AutoConfig

    model_type, fields = SIZES[size]
    config = AutoConfig.for_model(model_type, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, **fields)
    config.save_pretrained(directory)
    return directory


def build_bank(model_dir: Path, *, lora: bool, dtype: str, device: str):
    from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec

    spec = BankSpec(model=str(model_dir), tokenizer=str(TOKENIZER), random_init=True, dtype=dtype,
                    adapters=[AdapterSpec("policy")] if lora else [])
    torch.manual_seed(0)
    return AdapterBank(spec).to(device).eval()


@contextmanager
def case_context(case: str):
    """``lora_unmerged``: generation keeps peft's LoRA branches (the lever's anchor)."""
    if case != "lora_unmerged":
        yield
        return
    with mock.patch("lit_rlhf.models.bank.lora_merged", lambda model, adapter: nullcontext(0)):
        yield


def random_prompts(batch: int, length: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts: row i has up to a quarter of ``length`` padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    pads = torch.randint(0, length // 4 + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None] >= pads[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def timed(engine, bank, adapter, ids, mask, sampling) -> tuple[float, int]:
    """Seconds of one generate and the tokens it decoded (rows x steps). On CUDA wall-clock
    seconds; on CPU this process's CPU seconds (one thread): on a shared machine wall-clock time
    measures the neighbours' load as much as the engine."""
    clock = time.perf_counter if ids.is_cuda else time.process_time
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = clock()
    rollout = engine.generate(bank, adapter, ids, mask, sampling)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return clock() - start, rollout.response_ids.numel()


def greedy_agreement(engines: dict, bank, adapter, ids, mask, sampling) -> dict[str, float]:
    """Fraction of rows whose greedy response equals the ``hf`` engine's, per engine."""
    out = {name: engine.generate(bank, adapter, ids, mask, sampling.greedy()).response_ids
           for name, engine in engines.items()}
    width = min(r.shape[1] for r in out.values())
    return {name: round((r[:, :width] == out["hf"][:, :width]).all(dim=1).float().mean().item(), 3)
            for name, r in out.items()}


def measure_case(args, case: str, model_dir: Path, ids, mask, sampling) -> dict:
    """Warm-up, interleaved repeats and greedy agreement of every engine on one bank."""
    from lit_rlhf.rollout import build_engine

    bank = build_bank(model_dir, lora=case != "base", dtype=args.dtype, device=args.device)
    adapter = None if case == "base" else "policy"
    names = args.engines
    engines = {name: build_engine(name) for name in names}
    warmup, seconds, tokens = {}, {name: [] for name in names}, {}
    for name, engine in engines.items():
        warmup[name] = timed(engine, bank, adapter, ids, mask, sampling)[0]
    for _ in range(args.repeats):
        for name, engine in engines.items():
            s, tokens[name] = timed(engine, bank, adapter, ids, mask, sampling)
            seconds[name].append(s)
    agreement = greedy_agreement(engines, bank, adapter, ids, mask,
                                 replace(sampling, max_new_tokens=min(args.new_tokens, 32)))
    rate = {name: tokens[name] / statistics.median(seconds[name]) for name in names}
    return {
        name: {"tokens_per_s": round(rate[name], 1), "ratio_vs_hf": round(rate[name] / rate["hf"], 3),
               "warmup_s": round(warmup[name], 3), "seconds": [round(s, 4) for s in seconds[name]],
               "tokens": tokens[name], "greedy_rows_equal_to_hf": agreement[name]}
        for name in names
    }


def measure(args) -> dict:
    from lit_rlhf.rollout import SamplingConfig

    vocab = SIZES[args.size][1]["vocab_size"]
    # A stop id a random model samples with probability ~1/vocab per token: every run decodes the full length.
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_token_ids=[vocab - 1], pad_token_id=0)
    ids, mask = random_prompts(args.batch, args.prompt_len, vocab, args.device)
    results: dict = {"device": args.device, "size": args.size, "batch": args.batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "dtype": args.dtype, "torch": torch.__version__, "cases": {}}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    print(report(results), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(args.size, Path(tmp), args.prompt_len + args.new_tokens + 64)
        for case in args.cases:
            try:
                with case_context(case):
                    results["cases"][case] = measure_case(args, case, model_dir, ids, mask, sampling)
            except Exception as error:  # noqa: BLE001 -- a failing case is reported, the next one still runs
                results["cases"][case] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                traceback.print_exc()
            print(report_case(case, results["cases"][case]), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return results


def report(results: dict) -> str:
    """The heading of the table."""
    return (f"{results.get('gpu', results['device'])}, torch {results['torch']}, {results['size']} model, "
            f"batch {results['batch']}, prompt {results['prompt_len']} + {results['new_tokens']} new tokens, "
            f"{results['dtype']}\n"
            f"| case | engine | tokens/{'s' if results['device'] == 'cuda' else 'CPU-s'} (median) | x hf | warm-up s | "
            "greedy rows = hf |\n|---|---|---|---|---|---|")


def report_case(case: str, engines: dict) -> str:
    if "error" in engines:
        return f"| {case} | failed: {engines['error'][:300]} | | | | |"
    return "\n".join(f"| {case} | {name} | {r['tokens_per_s']:.0f} | {r['ratio_vs_hf']:.2f} | {r['warmup_s']:.2f} | "
                     f"{r['greedy_rows_equal_to_hf']:.2f} |" for name, r in engines.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None, help="model dtype; default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--engines", type=lambda text: text.split(","), default=list(ENGINES),
                        help=f"comma-separated engines to time, hf first (default: {','.join(ENGINES)})")
    parser.add_argument("--cases", type=lambda text: text.split(","), default=list(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny run (small model, batch 4, 16 + 8 tokens, 1 repeat)")
    args = parser.parse_args(argv)
    if args.engines[0] != "hf" or not set(args.engines) <= set(ENGINES):
        parser.error(f"--engines: hf first, then any of {ENGINES}; got {args.engines}")
    if args.smoke:
        args.size, args.batch, args.prompt_len, args.new_tokens, args.repeats = "small", 4, 16, 8, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    if args.device == "cpu":
        torch.set_num_threads(1)  # CPU seconds are the measure: one thread
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    sys.path.insert(0, str(REPO))
    results = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
