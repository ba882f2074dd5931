"""Three data-path levers measured against their anchors in one run, on one machine.

1. Preference methods: ONE forward over chosen and rejected rows stacked (what
   ``PreferenceCollator`` + ``PreferenceMethod.pair_logps`` do) vs the anchor, two forwards.
2. SFT: padding-free packing (``PackingCollator``) vs the anchor, right-padded batches, on
   examples with a long-tailed length distribution.
3. DPO: the padding-free forward of the offline methods (``OfflineMethod.completion_token_logps``: the
   stacked batch's real tokens packed into one row, ``models.packing.pack_rows``) vs the anchor, the
   padded stacked batch; time and peak memory of forward + backward.

The model is a randomly initialised Llama (``--hidden``, ``--layers``, ``--vocab``) so the
numbers do not depend on a download; forward + backward are timed, best of ``--repeats``. Peak
memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) above its size before the step, with glibc's
dynamic mmap threshold pinned so freed tensors leave the resident set.

    python benchmarks/training_levers.py [--hidden 256 --layers 4 --vocab 32000 --batch 16]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_rlhf.data import PackingCollator, PreferenceCollator, SFTCollator
from lit_rlhf.losses import sequence_logps
from lit_rlhf.models.packing import pack_rows


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(fn) -> float:
    """Memory ``fn`` adds at its peak, in MiB (see the module docstring for how, per device)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        # M_MMAP_THRESHOLD = 128 KiB, fixed: large tensors are mmapped and unmapped when freed, so one
        # step's peak is not hidden by memory the previous one left in the heap.
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    torch.manual_seed(0)
    rng = random.Random(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    ))

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, args.vocab) for _ in range(n)]

    def step(batch: dict) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits
        logps, _ = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        logps.sum().backward()

    def padding_free_step(batch: dict) -> None:
        model.zero_grad(set_to_none=True)
        # The rows OfflineMethod.packed builds for sdpa: seq * slots / tokens wide.
        ids, mask = batch["input_ids"], batch["attention_mask"]
        packed = pack_rows(ids, mask, row_width=ids.shape[1] * ids.numel() // int(mask.sum()))
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        logps, _ = sequence_logps(logits, ids, batch["completion_mask"], packed.layout)
        logps.sum().backward()

    # 1. stacked chosen + rejected vs two forwards
    pairs = [{"prompt_ids": ids(64), "chosen_ids": ids(rng.randint(32, 128)), "rejected_ids": ids(rng.randint(32, 128))}
             for _ in range(args.batch)]
    stacked = PreferenceCollator(0)(pairs)
    half = args.batch
    chosen = {k: v[:half] for k, v in stacked.items()}
    rejected = {k: v[half:] for k, v in stacked.items()}
    t_stacked = best_time(lambda: step(stacked), args.repeats)
    t_two = best_time(lambda: (step(chosen), step(rejected)), args.repeats)

    # 2. packing vs padding, lengths long-tailed (most short, a few long)
    examples = [{"prompt_ids": ids(16), "completion_ids": ids(min(480, int(rng.paretovariate(1.2) * 24)))}
                for _ in range(args.batch)]
    padded = SFTCollator(0)(examples)
    packed = PackingCollator(0)(examples)
    t_padded = best_time(lambda: step(padded), args.repeats)
    t_packed = best_time(lambda: step(packed), args.repeats)
    real_tokens = int(padded["attention_mask"].sum())

    # 3. DPO padding-free vs padded, prompt and completion lengths long-tailed like lever 2's
    def tail(scale: int, cap: int) -> list[int]:
        return ids(min(cap, int(rng.paretovariate(1.2) * scale)))

    dpo_batch = PreferenceCollator(0)([{"prompt_ids": tail(16, 128), "chosen_ids": tail(24, 256),
                                        "rejected_ids": tail(24, 256)} for _ in range(args.batch)])
    t_dpo_padded = best_time(lambda: step(dpo_batch), args.repeats)
    t_dpo_free = best_time(lambda: padding_free_step(dpo_batch), args.repeats)
    model.zero_grad(set_to_none=True)
    m_dpo_padded = peak_memory_mib(lambda: step(dpo_batch))
    model.zero_grad(set_to_none=True)
    m_dpo_free = peak_memory_mib(lambda: padding_free_step(dpo_batch))
    dpo_tokens = int(dpo_batch["attention_mask"].sum())
    dpo_rows = pack_rows(dpo_batch["input_ids"], dpo_batch["attention_mask"],
                         row_width=dpo_batch["input_ids"].shape[1] * dpo_batch["input_ids"].numel() // dpo_tokens)

    print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; batch {args.batch}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'lever':<34} {'anchor s':>9} {'ours s':>8} {'ours/anchor':>12}")
    print(f"{'preference: stacked vs 2 forwards':<34} {t_two:>9.3f} {t_stacked:>8.3f} {t_stacked / t_two:>12.2f}")
    print(f"{'sft: packed vs padded':<34} {t_padded:>9.3f} {t_packed:>8.3f} {t_packed / t_padded:>12.2f}")
    print(f"  padded batch {tuple(padded['input_ids'].shape)} = {padded['input_ids'].numel()} slots for "
          f"{real_tokens} real tokens; packed row {tuple(packed['input_ids'].shape)}")
    print(f"{'dpo: padding-free vs padded':<34} {t_dpo_padded:>9.3f} {t_dpo_free:>8.3f} {t_dpo_free / t_dpo_padded:>12.2f}")
    device = "cuda max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS"
    print(f"{'  peak memory MiB (' + device + ')':<34} {m_dpo_padded:>9.0f} {m_dpo_free:>8.0f} "
          f"{m_dpo_free / m_dpo_padded:>12.2f}")
    print(f"  stacked batch {tuple(dpo_batch['input_ids'].shape)} = {dpo_batch['input_ids'].numel()} slots for "
          f"{dpo_tokens} real tokens; packed rows {tuple(dpo_rows.input_ids.shape)}")


if __name__ == "__main__":
    main()
