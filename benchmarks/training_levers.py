"""Two data-path levers measured against their anchors in one run, on one machine.

1. Preference methods: ONE forward over chosen and rejected rows stacked (what
   ``PreferenceCollator`` + ``PreferenceMethod.pair_logps`` do) vs the anchor, two forwards.
2. SFT: padding-free packing (``PackingCollator``) vs the anchor, right-padded batches, on
   examples with a long-tailed length distribution.

The model is a randomly initialised Llama (``--hidden``, ``--layers``, ``--vocab``) so the
numbers do not depend on a download; forward + backward are timed, best of ``--repeats``.

    python benchmarks/training_levers.py [--hidden 256 --layers 4 --vocab 32000 --batch 16]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_rlhf.data import PackingCollator, PreferenceCollator, SFTCollator
from lit_rlhf.losses import sequence_logps


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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

    print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; batch {args.batch}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'lever':<34} {'anchor s':>9} {'ours s':>8} {'ours/anchor':>12}")
    print(f"{'preference: stacked vs 2 forwards':<34} {t_two:>9.3f} {t_stacked:>8.3f} {t_stacked / t_two:>12.2f}")
    print(f"{'sft: packed vs padded':<34} {t_padded:>9.3f} {t_packed:>8.3f} {t_packed / t_padded:>12.2f}")
    print(f"  padded batch {tuple(padded['input_ids'].shape)} = {padded['input_ids'].numel()} slots for "
          f"{real_tokens} real tokens; packed row {tuple(packed['input_ids'].shape)}")


if __name__ == "__main__":
    main()
