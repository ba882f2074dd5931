"""Peak memory of taking log-probs of the taken tokens: chunked ``token_logps`` vs the anchor.

The anchor is the obvious implementation, ``log_softmax(logits.float()).gather(...)``, which
materialises a float32 copy of the full-vocabulary logits. Each variant runs forward and
backward in its own process so that peak RSS is its own; the report is the ratio of the
extra memory above the shared inputs.

    python benchmarks/logprobs_memory.py [--vocab 32000 --batch 8 --seq 512 --dtype bfloat16]

With ``--head``: one forward + backward of a random Llama (tiny hidden, large vocabulary) over a DPO-shaped
stacked batch, its completion log-probs summed, with the LM head on the completion-predicting positions
(``models.head.head_on``, what ``OfflineMethod.completion_token_logps`` runs) three ways: ``fused``
(``losses.head_token_logps``, no logits tensor), ``logits`` (the kept positions' logits reduced by
``token_logps``, the path before the fused head) and ``full`` (every position's logits). Peak memory is the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up step) above its
resident set before the step, glibc's mmap threshold pinned so that freed tensors leave the resident set;
time is the best of ``--repeats`` steps. ``--frozen-head`` freezes the head and embeddings (the LoRA case).

    python benchmarks/logprobs_memory.py --head [--vocab 128000 --hidden 64 --batch 16 --seq 256]
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


def _status_kib(field: str) -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_head_variant(variant: str, vocab: int, hidden: int, batch: int, seq: int, frozen_head: bool,
                     repeats: int) -> dict:
    import ctypes
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_rlhf.losses import head_token_logps, token_logps
    from lit_rlhf.models.head import head_on

    # M_MMAP_THRESHOLD = 128 KiB, fixed: large tensors are mmapped and unmapped when freed.
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=False))
    if frozen_head:
        model.get_output_embeddings().requires_grad_(False)
        model.get_input_embeddings().requires_grad_(False)
    head = model.get_output_embeddings()
    ids = torch.randint(0, vocab, (batch, seq))
    # Prompts of a quarter of the row, the rest completion: position t predicts token t + 1.
    predicts = torch.zeros(batch, seq, dtype=torch.bool)
    predicts[:, seq // 4 - 1 : seq - 1] = True
    labels = ids[:, 1:][predicts[:, :-1]]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if variant == "full":
            logits = model(input_ids=ids, use_cache=False).logits
            logps = token_logps(logits[predicts][None], labels[None])
        else:
            with head_on(head, predicts, passthrough=variant == "fused") as selected:
                out = model(input_ids=ids, use_cache=False).logits
            if variant == "fused":
                logps, _ = head_token_logps(selected[0][0], head.weight, head.bias, labels)
            else:
                logps = token_logps(out, labels[None])
        logps.sum().backward()
        return logps.sum().item()

    step()  # warm-up: one-off allocations do not count
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    checksum = step()
    peak = _status_kib("VmHWM")
    return {"variant": variant, "extra_mib": (peak - before) / 1024, "seconds": min(times), "checksum": checksum,
            "kept": int(predicts.sum())}


def head_main(args) -> None:
    results = {}
    for variant in ("full", "logits", "fused"):
        cmd = [sys.executable, __file__, "--head", "--variant", variant, "--vocab", str(args.vocab), "--hidden",
               str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
        cmd += ["--frozen-head"] if args.frozen_head else []
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    kept = results["fused"]["kept"]
    print(f"Llama hidden {args.hidden}, 2 layers, vocab {args.vocab}, {args.batch} rows x {args.seq}, float32; "
          f"head {'frozen' if args.frozen_head else 'trained'}; logits of the {kept} kept positions = "
          f"{kept * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"{'variant':<8} {'extra MiB':>10} {'seconds':>8}")
    for r in results.values():
        print(f"{r['variant']:<8} {r['extra_mib']:>10.0f} {r['seconds']:>8.3f}")
    fused, logits, full = results["fused"], results["logits"], results["full"]
    print(f"fused / logits: memory {fused['extra_mib'] / logits['extra_mib']:.2f}, time "
          f"{fused['seconds'] / logits['seconds']:.2f}; fused / full: memory {fused['extra_mib'] / full['extra_mib']:.2f}, "
          f"time {fused['seconds'] / full['seconds']:.2f}; same result: "
          f"{all(abs(r['checksum'] - full['checksum']) <= 1e-4 * abs(full['checksum']) for r in results.values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--head", action="store_true", help="the LM head fused into the log-probs vs its logits")
    parser.add_argument("--hidden", type=int, default=64, help="--head: the model's hidden size")
    parser.add_argument("--frozen-head", action="store_true", help="--head: head and embeddings frozen (LoRA)")
    parser.add_argument("--repeats", type=int, default=2, help="--head: timed steps per variant (best kept)")
    args = parser.parse_args()
    if args.head:
        if args.variant:
            print(json.dumps(run_head_variant(args.variant, args.vocab, args.hidden, args.batch, args.seq,
                                              args.frozen_head, args.repeats)))
        else:
            head_main(args)
        return
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
