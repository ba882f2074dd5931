"""Peak memory of a PPO-like step per ``bank.gradient_checkpointing`` setting: off, every role, the
policy only (and the value adapter only), on one bank carrying a LoRA policy and a LoRA critic.

The step is what a PPO update runs: the policy's forward over prompt + response (log-probs of the
taken tokens, chunked), the value adapter's forward over the same tokens, one backward of the sum.

Memory is the peak of the bytes the step holds through torch's CPU allocator, above what was live
before it: ``torch.profiler`` with ``profile_memory=True`` reports every allocation and free of
``c10``'s CPU allocator (each tensor storage: the activations autograd saves, the logits, the
gradients), and the running sum of those events in time order peaks where the step holds the most.
Process RSS would mix in the model's load and whatever the C allocator keeps; this sees tensors only
(oneDNN scratch buffers, which bypass it, are not counted). "after fwd" is what was live when the
backward began. Time is measured apart, without the profiler. Each setting gets its own bank with the same weights, and the gradients are checked
equal to the run without checkpointing.

    OMP_NUM_THREADS=1 python benchmarks/checkpointing_memory.py [--batch 8 --seq 512 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import LlamaConfig

from lit_rlhf.losses import token_logps
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec

SETTINGS = {"off": False, "all roles": True, "policy only": ["policy"], "value only": ["value"]}
BACKWARD = "ppo_like_step.backward"  # a profiler range: where the forwards end


def ppo_like_step(bank: AdapterBank, ids: torch.Tensor) -> None:
    mask = torch.ones_like(ids)
    logps = token_logps(bank(ids, mask).logits[:, :-1], ids[:, 1:])
    values = bank.values(ids, mask, adapter="value")
    with record_function(BACKWARD):
        (-logps.mean() + values.pow(2).mean()).backward()


def step_memory_mib(step: Callable[[], None]) -> tuple[float, float]:
    """``step()``'s peak of live tensor bytes above those live before it, and what its forwards left alive
    when its backward (a ``BACKWARD`` profiler range) began, from the profiler's allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    backward_starts = next(e.start_ns() for e in events if e.name() == BACKWARD)
    live = peak = 0
    after_forwards = None
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if after_forwards is None and start >= backward_starts:
            after_forwards = live
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20, after_forwards / 2**20


def step_seconds(bank: AdapterBank, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        bank.zero_grad(set_to_none=True)
        start = time.perf_counter()
        ppo_like_step(bank, ids)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(model_dir: str, setting, ids: torch.Tensor, repeats: int) -> dict:
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=model_dir, random_init=True, gradient_checkpointing=setting),
                       require=[AdapterSpec("policy"), AdapterSpec("value", head="value")])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # both adapters away from the base (a fresh LoRA is a no-op), as after some training
        for name, p in bank.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=generator)
    seconds = step_seconds(bank, ids, repeats)
    bank.zero_grad(set_to_none=True)
    peak, after_forwards = step_memory_mib(lambda: ppo_like_step(bank, ids))
    grads = {n: p.grad for n, p in bank.named_parameters() if p.grad is not None}
    return {"peak_mib": peak, "after_forwards_mib": after_forwards, "step_s": seconds, "grads": grads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="prompt + response tokens per row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per setting (median)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # vs_trl's `small` shape, at a PPO-like length.
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab,
                         max_position_embeddings=max(2048, args.seq), pad_token_id=0)
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(Path(tmp))
        for name, setting in SETTINGS.items():
            results[name] = measure(tmp, setting, ids, args.repeats)
    off = results["off"]
    print(f"PPO-like step: policy + value forwards on one bank, one backward; {args.layers} layers, hidden "
          f"{args.hidden}, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, float32, 1 thread")
    print(f"{'gradient_checkpointing':<24} {'peak MiB':>9} {'vs off':>7} {'after fwd MiB':>14} {'step s':>7} "
          f"{'vs off':>7}  grads = off")
    for name, r in results.items():
        same = all(torch.allclose(r["grads"][n], g, atol=1e-5, rtol=1e-4) for n, g in off["grads"].items())
        print(f"{name:<24} {r['peak_mib']:>9.1f} {r['peak_mib'] / off['peak_mib']:>7.2f} {r['after_forwards_mib']:>14.1f} "
              f"{r['step_s']:>7.3f} {r['step_s'] / off['step_s']:>7.2f}  {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), **{n: {k: v for k, v in r.items() if k != "grads"} for n, r in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
