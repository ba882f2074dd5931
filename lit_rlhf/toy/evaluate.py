"""Ground-truth evaluation on the toy task: how positive are a role's completions?

The command-line evaluation is ``lit-rlhf evaluate`` (``lit_rlhf.evaluate``); these helpers serve
tests and examples that hold a bank in memory. Generation goes through the rollout engine
(``lit_rlhf.inference.sample``), the one path every sampler uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_rlhf import toy
from lit_rlhf.inference import Policy, prompt_batches, sample
from lit_rlhf.rollout import SamplingConfig


@torch.no_grad()
def completions(bank, tokenizer, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 8,
                do_sample: bool = False, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` by ``adapter`` (the reference when ``None``), greedy unless sampling."""

    torch.manual_seed(seed)
    policy = Policy(bank, tokenizer, adapter, Path("."))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample)
    batch = next(prompt_batches(policy, prompts, batch_size=len(prompts)))
    return sample(policy, batch, sampling, adapter=adapter)[0]


def mean_score(bank, tokenizer, prompts: list[str], *, adapter: str | None, **kwargs) -> float:
    """Mean ground-truth score (in [-1, 1]) of the completions of ``prompts``."""
    texts = completions(bank, tokenizer, prompts, adapter=adapter, **kwargs)
    return sum(toy.score(t) for t in texts) / len(texts)
