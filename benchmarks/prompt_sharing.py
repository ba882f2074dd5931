"""Rows that share a prompt run it once (``models.prefix``) vs whole rows, and the LM head fused into the
log-probs (``OnlineMethod.fused_response_logprobs``: no logits tensor) vs logits: time and peak memory of
the online methods' forwards over a GRPO-shaped rollout (``--prompts`` prompts x ``--samples`` samples).

Two steps, in each of the four settings on the same bank and rollout, against whole rows with logits (the
anchor): the policy's forward with gradient + backward (the update's pass; log-probs of the taken tokens),
and the no-grad reference forward (RLOO, PPO, GRPO with a KL). Prompts are left-padded with lengths drawn
from ``[--prompt-len / 2, --prompt-len]``, responses ``--response-len`` tokens (a random model rarely
stops). Peak memory: live tensor bytes of torch's CPU allocator (``checkpointing_memory.step_memory_mib``)
or ``torch.cuda.max_memory_allocated``. Gradients are checked equal to the anchor's.

    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py [--prompts 4 --samples 4 --prompt-len 32]
    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py --vocab 65536 --hidden 128   # the head's share grows
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import record_function
from transformers import LlamaConfig

from checkpointing_memory import BACKWARD, step_memory_mib
from training_levers import peak_memory_mib
from lit_rlhf.methods import GRPO
from lit_rlhf.models import BankSpec
from lit_rlhf.rollout import RewardSpec, Rollout

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "toy" / "base"


def make_rollout(args, device) -> Rollout:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=g)
    mask = (torch.arange(args.prompt_len)[None] >= (args.prompt_len - lengths)[:, None]).long()
    ids = torch.randint(4, args.vocab, (args.prompts, args.prompt_len), generator=g) * mask
    rows = args.prompts * args.samples
    response = torch.randint(4, args.vocab, (rows, args.response_len), generator=g)
    return Rollout(ids.repeat_interleave(args.samples, 0).to(device), mask.repeat_interleave(args.samples, 0).to(device),
                   response.to(device), torch.ones_like(response).to(device), torch.zeros(rows, dtype=torch.bool, device=device))


def policy_step(method: GRPO, rollout: Rollout) -> None:
    logps = method.policy_forward(rollout).logprobs
    with record_function(BACKWARD):
        logps.mean().backward()


def seconds(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def peak_mib(fn, device) -> float:
    return peak_memory_mib(fn) if device.type == "cuda" else step_memory_mib(fn)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step and setting (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab, pad_token_id=0,
                         max_position_embeddings=max(2048, args.prompt_len + args.response_len))
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(Path(tmp))
        torch.manual_seed(0)
        method = GRPO(bank=BankSpec(model=tmp, tokenizer=str(TOKENIZER), random_init=True),
                      rewards=[RewardSpec("function", function="lit_rlhf.toy:reward")],
                      num_samples_per_prompt=args.samples)
        method.configure_model()
    method.to(device)
    with torch.no_grad():  # the policy away from the base, as after some training
        for name, p in method.bank.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    rollout = make_rollout(args, device)
    assert method.shares_prompts() and method.fuses_policy_head()
    results, grads = {}, {}
    for sharing, fused in ((False, False), (True, False), (False, True), (True, True)):
        setting = f"{'shared prompts' if sharing else 'whole rows'}, {'fused head' if fused else 'logits'}"
        method._prompt_sharing, method._fused_head = sharing, fused
        method.bank.zero_grad(set_to_none=True)
        policy_step(method, rollout)
        grads[setting] = [p.grad.clone() for p in method.bank.parameters() if p.grad is not None]

        def update():
            method.bank.zero_grad(set_to_none=True)
            policy_step(method, rollout)

        results[setting] = dict(update_s=seconds(update, args.repeats, device), update_mib=peak_mib(update, device),
                                reference_s=seconds(lambda: method.reference_logprobs(rollout), args.repeats, device))
    anchor = "whole rows, logits"
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for g in grads.values() for a, b in zip(grads[anchor], g))
    print(f"{args.prompts} prompts x {args.samples} samples, prompts <= {args.prompt_len} + {args.response_len} tokens; "
          f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, LoRA policy, {args.device}, 1 thread")
    print(f"{'':<28} {'update s':>9} {'peak MiB':>9} {'reference s':>12}   ratios to {anchor}: update time, "
          "peak memory, reference time")
    base = results[anchor]
    for name, r in results.items():
        ratios = ", ".join(f"{r[k] / base[k]:.2f}" for k in ("update_s", "update_mib", "reference_s"))
        print(f"{name:<28} {r['update_s']:>9.3f} {r['update_mib']:>9.1f} {r['reference_s']:>12.3f}   {ratios}")
    print(f"gradients equal to {anchor}'s: {same}")


if __name__ == "__main__":
    main()
