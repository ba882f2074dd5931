"""Ground-truth evaluation on the toy task: how positive are a role's completions?"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_rlhf import toy
from lit_rlhf.rollout import SamplingConfig, build_engine


@torch.no_grad()
def completions(bank, tokenizer, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 8,
                do_sample: bool = False, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` by ``adapter`` (the reference when ``None``), greedy unless sampling."""
    torch.manual_seed(seed)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    device = next(bank.parameters()).device
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample).resolved(tokenizer)
    rollout = build_engine("hf").generate(
        bank, adapter, encoded["input_ids"].to(device), encoded["attention_mask"].to(device), sampling
    )
    return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


def mean_score(bank, tokenizer, prompts: list[str], *, adapter: str | None, **kwargs) -> float:
    """Mean ground-truth score (in [-1, 1]) of the completions of ``prompts``."""
    texts = completions(bank, tokenizer, prompts, adapter=adapter, **kwargs)
    return sum(toy.score(t) for t in texts) / len(texts)


def main() -> None:
    """Score an exported adapter against the reference on the held-out toy prompts."""
    import argparse

    from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("adapter", help="an adapter directory, or a run directory (its newest export/adapter is used)")
    parser.add_argument("--base", default="assets/toy/base")
    parser.add_argument("--samples", type=int, default=8, help="sampled completions per held-out prompt")
    args = parser.parse_args()
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").exists():
        found = sorted(adapter.glob("**/export/adapter/adapter_config.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            parser.error(f"{adapter} holds no adapter_config.json and no export/adapter below it")
        adapter = found[-1].parent
    print(f"adapter: {adapter}")
    spec = BankSpec(model=args.base, adapters=[AdapterSpec("policy", path=str(adapter), trainable=False)])
    bank, tokenizer = AdapterBank(spec).eval(), load_tokenizer(spec)
    _, held_out = toy.split_prompts()
    for label, adapter in (("reference", None), ("trained", "policy")):
        greedy = mean_score(bank, tokenizer, held_out, adapter=adapter)
        sampled = mean_score(bank, tokenizer, held_out * args.samples, adapter=adapter, do_sample=True)
        print(f"{label:>9}: greedy score {greedy:+.3f}   sampled score {sampled:+.3f}   "
              f"e.g. {completions(bank, tokenizer, held_out[:1], adapter=adapter)[0]!r}")


if __name__ == "__main__":
    main()
