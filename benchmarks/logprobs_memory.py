"""Peak memory of taking log-probs of the taken tokens: chunked ``token_logps`` vs the anchor.

The anchor is the obvious implementation, ``log_softmax(logits.float()).gather(...)``, which
materialises a float32 copy of the full-vocabulary logits. Each variant runs forward and
backward in its own process so that peak RSS is its own; the report is the ratio of the
extra memory above the shared inputs.

    python benchmarks/logprobs_memory.py [--vocab 32000 --batch 8 --seq 512 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, vocab: int, batch: int, seq: int, dtype: str) -> dict:
    import torch

    from lit_rlhf.losses import token_logps

    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, dtype=getattr(torch, dtype), requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "anchor":
        out = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        out = token_logps(logits, labels)
    out.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "extra_mib": (peak - before) / 1024, "seconds": seconds, "checksum": out.sum().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.batch, args.seq, args.dtype)))
        return
    results = {}
    for variant in ("anchor", "token_logps"):
        cmd = [sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab), "--batch", str(args.batch),
               "--seq", str(args.seq), "--dtype", args.dtype]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    anchor, ours = results["anchor"], results["token_logps"]
    logits_mib = args.batch * args.seq * args.vocab * (2 if args.dtype in ("bfloat16", "float16") else 4) / 2**20
    print(f"logits {args.batch}x{args.seq}x{args.vocab} {args.dtype} = {logits_mib:.0f} MiB")
    print(f"{'variant':<12} {'extra MiB':>10} {'seconds':>8}")
    for r in (anchor, ours):
        print(f"{r['variant']:<12} {r['extra_mib']:>10.0f} {r['seconds']:>8.2f}")
    print(f"memory ratio token_logps / anchor: {ours['extra_mib'] / anchor['extra_mib']:.2f}   "
          f"time ratio: {ours['seconds'] / anchor['seconds']:.2f}   "
          f"same result: {abs(ours['checksum'] - anchor['checksum']) < 1e-2 * abs(anchor['checksum'])}")


if __name__ == "__main__":
    main()
