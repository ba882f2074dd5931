"""Fixed cost of the bank's role switches, per call: ``role()`` of the active adapter, ``reference()``
(adapters off, eval mode, no grad) and ``eval_mode``. It depends on how many modules the model has
(peft adds ~12 per adapted linear layer), not on their width, so the model is deep and narrow: the
depth of Qwen2.5-0.5B (24 layers) at hidden 64, LoRA on every linear layer. A DPO step runs one
``role()`` and one ``reference()``; an online rollout about five ``role()``, one ``reference()`` and
three ``eval_mode``; on a GPU these are pure Python time next to a step of well under a second.

    python benchmarks/role_switch.py [--layers 24 --calls 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.models.bank import eval_mode
from lit_rlhf.toy.build import build_tokenizer


def per_call_ms(block, calls: int) -> float:
    def run():
        with block():
            pass

    run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(Path(tmp))
        tokenizer.save_pretrained(Path(tmp))
        bank = AdapterBank(BankSpec(model=tmp), require=[AdapterSpec("policy")], reference_of="policy")
    bank.train()
    modules = sum(1 for _ in bank.modules())
    print(f"{args.layers} layers, {modules} modules, LoRA on all linear layers; ms per call (mean of {args.calls})")
    print(f"role(active)  {per_call_ms(lambda: bank.role('policy'), args.calls):8.2f}")
    print(f"reference()   {per_call_ms(bank.reference, args.calls):8.2f}")
    print(f"eval_mode     {per_call_ms(lambda: eval_mode(bank), args.calls):8.2f}")


if __name__ == "__main__":
    main()
