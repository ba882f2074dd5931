"""Ground-truth evaluation on the toy task: how positive are a role's completions?"""

from __future__ import annotations

import torch

from lit_rlhf import toy


@torch.no_grad()
def completions(bank, tokenizer, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 8,
                do_sample: bool = False, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` by ``adapter`` (the reference when ``None``), greedy unless sampling."""
    torch.manual_seed(seed)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    device = next(bank.parameters()).device
    output = bank.generate(
        encoded["input_ids"].to(device),
        encoded["attention_mask"].to(device),
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def mean_score(bank, tokenizer, prompts: list[str], *, adapter: str | None, **kwargs) -> float:
    """Mean ground-truth score (in [-1, 1]) of the completions of ``prompts``."""
    texts = completions(bank, tokenizer, prompts, adapter=adapter, **kwargs)
    return sum(toy.score(t) for t in texts) / len(texts)
