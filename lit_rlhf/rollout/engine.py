"""Generation engines: prompts in, a ``Rollout`` of responses out.

An engine is anything with ``generate(bank, adapter, prompt_ids, prompt_mask, sampling) ->
Rollout`` (the ``RolloutEngine`` protocol), registered under a name the config chooses
(``engine: hf``). Methods only ever see a ``Rollout``, so a faster engine (a static KV cache
with a compiled decode step, vLLM with synced LoRA weights) is added with
``@register_engine("name")`` and no change to any method.

Behaviour log-probs are NOT taken from the engine: transformers' ``scores`` are the logits
after temperature / top-k / top-p warping, and a vLLM engine would compute them with other
kernels. The online methods recompute them with one forward pass of the policy
(``lit_rlhf.losses.token_logps``, the one log-prob path), so the PPO ratio compares like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin

__all__ = [
    "ENGINES",
    "HFGenerateEngine",
    "HFStaticCacheEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "build_engine",
    "generating_with",
    "generation_config",
    "register_engine",
    "truncate_at_stop",
]


@dataclass
class SamplingConfig:
    """How responses are sampled.

    The defaults sample from the policy's own distribution (temperature 1, no top-k, no
    top-p), which is what the PPO ratio and the KL estimate assume. With another temperature
    the methods divide the logits by it when they recompute log-probs; top-k and top-p
    truncation are not reflected in the recomputed log-probs (as in TRL).

    These fields are the whole generation config: the model's own ``generation_config.json``
    (repetition penalty, n-gram bans, minimum length, ... common in instruct models) is ignored,
    so the same weights roll out the same way with or without it. Knobs that reshape the
    distribution are deliberately absent: the log-probs recomputed for the loss would not describe
    the samples.

    Args:
        max_new_tokens: the longest response in tokens; a response that reaches it without a
            stop token is *truncated* (see ``missing_eos_penalty`` of the online methods).
        temperature: softmax temperature of sampling.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        top_p: nucleus sampling mass; 1.0 keeps all.
        do_sample: sample (True) or decode greedily (False).
        stop_token_ids: token ids that end a response; the tokenizer's EOS when ``None``.
        pad_token_id: id written after a response ends; the tokenizer's pad when ``None``.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    stop_token_ids: list[int] | None = None
    pad_token_id: int | None = None

    def resolved(self, tokenizer) -> SamplingConfig:
        """A copy with ``stop_token_ids`` and ``pad_token_id`` filled from ``tokenizer``."""
        stop = self.stop_token_ids
        if stop is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token: set sampling.stop_token_ids to the ids that end a response")
            stop = [tokenizer.eos_token_id]
        pad = self.pad_token_id if self.pad_token_id is not None else tokenizer.pad_token_id
        return replace(self, stop_token_ids=list(stop), pad_token_id=pad)

    def greedy(self) -> SamplingConfig:
        return replace(self, do_sample=False)


class Rollout(NamedTuple):
    """Prompts and the responses sampled for them.

    Attributes:
        prompt_ids: ``(batch, prompt_len)`` long, LEFT-padded (generation starts at the last column).
        prompt_mask: ``(batch, prompt_len)`` long, 1 on prompt tokens.
        response_ids: ``(batch, resp_len)`` long, RIGHT-padded with the pad id after the first stop token.
        response_mask: ``(batch, resp_len)`` long, 1 up to and including the first stop token.
        ended: ``(batch,)`` bool, True where the response ended with a stop token (False: it was
            cut at ``max_new_tokens``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt + response ids. ``(batch, prompt_len + resp_len)``."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(batch, prompt_len + resp_len)``: left padding, prompt, response, right padding."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over attended tokens only, as ``generate`` used them with left padding.

        Without them a causal LM numbers the columns 0..n-1, so a left-padded row would be read
        at other positions than it was sampled at (harmless for RoPE, wrong for absolute positions).
        """
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:
        """``(batch,)`` long, tokens in each response including its stop token."""
        return self.response_mask.sum(dim=1)

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rows ``index`` of every field."""
        return Rollout(*(t[index] for t in self))


def truncate_at_stop(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
) -> Rollout:
    """Cut each response after its first stop token and build the masks.

    Args:
        prompt_ids, prompt_mask: ``(batch, prompt_len)`` left-padded prompts.
        response_ids: ``(batch, resp_len)`` raw generated ids (anything after a stop token is ignored).
        stop_token_ids: ids that end a response.
        pad_token_id: written after the first stop token.

    Returns:
        A ``Rollout``; ``response_mask`` is 1 up to and including the first stop token (every
        position when there is none), and ``ended`` says whether there was one.
    """
    stops = torch.tensor(list(stop_token_ids), device=response_ids.device)
    is_stop = torch.isin(response_ids, stops)
    # Number of stop tokens strictly before each position: 0 means "still inside the response".
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    response_mask = (stops_before == 0).long()
    response_ids = response_ids.masked_fill(response_mask == 0, pad_token_id)
    ended = is_stop.any(dim=1)
    return Rollout(prompt_ids, prompt_mask.long(), response_ids, response_mask, ended)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from one adapter of a bank; the bank's active adapter is unchanged after."""

    def generate(
        self, bank, adapter: str | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
        *, teacher: bool = False,
    ) -> Rollout:
        """Responses of ``adapter`` (the reference policy when ``None``; the distillation teacher
        with ``teacher=True``) to left-padded prompts.

        Args:
            bank: the ``AdapterBank``.
            adapter: the policy adapter to sample from.
            teacher: sample from the bank's teacher instead (``adapter`` then ``None``).
            prompt_ids, prompt_mask: ``(batch, prompt_len)`` left-padded.
            sampling: a ``SamplingConfig`` with ``stop_token_ids`` and ``pad_token_id`` resolved.
        """
        ...


ENGINES: dict[str, Callable[[], RolloutEngine]] = {}


def register_engine(name: str):
    """Class decorator: make an engine available as ``engine: <name>`` in configs."""

    def add(cls):
        if name in ENGINES:
            raise ValueError(f"a rollout engine named {name!r} is already registered ({ENGINES[name]})")
        ENGINES[name] = cls
        return cls

    return add


def build_engine(name: str) -> RolloutEngine:
    """The engine registered as ``name``."""
    if name not in ENGINES:
        raise KeyError(f"no rollout engine named {name!r}; registered engines: {sorted(ENGINES)}")
    return ENGINES[name]()


def generation_config(sampling: SamplingConfig, **extra) -> GenerationConfig:
    """Every setting a rollout is generated with, from ``sampling`` alone (``extra``: how, never what,
    e.g. ``cache_implementation``).

    Nothing else reaches ``generate`` (see ``generating_with``): a knob that reshapes the
    distribution (repetition penalty, n-gram bans, minimum length, banned words) would make the
    samples come from a policy the recomputed log-probs do not describe, so ``SamplingConfig`` has
    no such field.
    """
    if sampling.stop_token_ids is None or sampling.pad_token_id is None:
        raise ValueError("resolve the sampling config first: sampling.resolved(tokenizer)")
    # Unset warpers fall back to transformers' global defaults (top_k=50): set them explicitly.
    warpers = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p) if sampling.do_sample else {}
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=sampling.pad_token_id,
        do_sample=sampling.do_sample,
        use_cache=True,
        **warpers,
        **extra,
    )


@contextmanager
def generating_with(module: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the generation config of every generating model inside ``module`` for the duration.

    Passing ``generation_config=`` to ``generate`` is not enough: transformers (5.x,
    ``GenerationMixin._prepare_generation_config``) fills every field left unset in it from the
    model's own ``generation_config.json``, so a base shipping ``repetition_penalty`` would still
    apply it. Swapping the model's config itself leaves nothing to fill in but transformers'
    neutral global defaults. (peft's ``PeftModel.generate`` reads the wrapped model's config, so
    this covers LoRA roles, full-mode reference copies and a separate teacher alike.)
    """
    models = [m for m in module.modules() if isinstance(m, GenerationMixin)]
    saved = [m.generation_config for m in models]
    try:
        for m in models:
            m.generation_config = config
        yield
    finally:
        for m, own in zip(models, saved):
            m.generation_config = own


@register_engine("hf")
class HFGenerateEngine:
    """transformers ``generate`` with its dynamic KV cache: works for every model, on every device."""

    cache_implementation: str | None = None

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling: SamplingConfig, *, teacher: bool = False) -> Rollout:
        config = generation_config(sampling, cache_implementation=self.cache_implementation)
        with generating_with(bank, config):
            out = bank.generate(prompt_ids, prompt_mask, adapter=adapter, teacher=teacher)
        response = out[:, prompt_ids.shape[1]:]
        return truncate_at_stop(prompt_ids, prompt_mask, response, sampling.stop_token_ids, sampling.pad_token_id)


@register_engine("hf_static")
class HFStaticCacheEngine(HFGenerateEngine):
    """``generate`` with a static (preallocated) KV cache; on CUDA transformers then compiles the
    decode step (``generation_config.compile_config``). The first call per shape pays the compile."""

    cache_implementation = "static"
